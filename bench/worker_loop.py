"""The shard worker's own code in this process (no Ray) beside the bare diffusers loop:

    python bench/worker_loop.py --profile gpu     # SD-1.5-shaped fp16 pipeline; run by bench/gpu.sh
    python bench/worker_loop.py --profile cpu     # the tiny model

(a) bare: bench/throughput.py's bare loop (in-memory prompts, no I/O, one warm-up call first). (b) the
same prompts, after the same warm-up call on the worker's generator, as a
Parquet file through one `ShardWorker` built in-process (imagemill.testing.in_process): rows read
and validated, generated, encoded by the writer threads (or, for JPEG on CUDA, by nvJPEG on the GPU),
written to local files with metadata and stats, stage by stage, as an actor does; once with PNG,
once with JPEG. This is the part that decides a GPU's throughput; Ray's scheduling overhead is
measured on the CPU profile by bench/throughput.py, whose GPU machine has no Ray. Each variant runs in
its own process; the variants take turns for --repeats rounds and medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from throughput import (
    PROFILES,
    _child,
    _machine,
    _write_input,
    build_model,
    publish,
    run_bare,
    run_rounds,
    variant_arguments,
)

FORMATS = {"imagemill png": "png", "imagemill jpeg": "jpeg"}


def run_worker(settings: dict, model: Path, work: Path, image_format: str) -> dict:
    import torch

    import imagemill
    from imagemill.testing.in_process import load_worker, run_shards
    from imagemill.workers.generators.contract import BatchKey
    from imagemill.workers.stage_timer import STAGES

    spec = imagemill.build_spec(
        {
            "input": {"path": str(_write_input(settings, work)), "rows_per_shard": 64},
            "output": {"path": str(work / "out"), "image_format": image_format},
            "model": {"source": str(model), "dtype": settings["dtype"]},
            "generation": {
                "width": settings["size"],
                "height": settings["size"],
                "num_inference_steps": settings["steps"],
                "guidance_scale": settings["guidance"],
            },
            "workers": {"batch_size": settings["batch_size"]},
        }
    )
    worker = load_worker(spec)
    # One warm-up call, as the bare loop makes (and as a long-running actor is warm): the first call
    # on a device pays one-time costs (CUDA's lazily loaded kernels, cuDNN/cuBLAS set-up, the caching
    # allocator growing) that are no part of the per-image rate. Without it, a 128-image run charged
    # them to the worker alone.
    size, batch = settings["size"], settings["batch_size"]
    key = BatchKey(size, size, settings["steps"], settings["guidance"])
    worker.generator.generate(["warm-up"] * batch, [None] * batch, list(range(batch)), key)
    if worker.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    stats = run_shards(worker)
    seconds = time.perf_counter() - started
    stages = {stage: round(sum(s.stage_seconds[stage] for s in stats), 2) for stage in STAGES}
    stages["write_wait"] = round(sum(s.write_wait_seconds for s in stats), 2)
    return {
        "images_per_second": sum(s.ok for s in stats) / seconds,
        "stages": stages,
        "encoder": "nvJPEG (GPU)"
        if worker.stages.get("copy_back").device_jpeg
        else "Pillow (writer threads)",
    }


def run_variant(name: str, settings: dict, model: Path, work: Path) -> dict:
    if name == "bare":
        return run_bare(settings, model, work)
    return run_worker(settings, model, work, FORMATS[name])


def report(profile: str, settings: dict, repeats: int, runs: dict[str, list[dict]]) -> str:
    median = {name: statistics.median(r["images_per_second"] for r in rs) for name, rs in runs.items()}
    lines = [
        f"## Shard worker in-process vs bare loop, {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/worker_loop.py --profile {profile} --rows {settings['rows']} "
        f"--repeats {repeats}`",
        "",
        f"Settings: {settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']}; one worker in "
        "one process, no Ray (its overhead: the throughput section of the CPU profile); "
        f"medians of {repeats} rounds, variants taking turns. Stage seconds summed over shards "
        "(image_encode and upload are writer-thread time, overlapping the model's, except nvJPEG's).",
        "",
        "| variant | images/s (median) | ÷ bare | all rounds | JPEG encoder | stage s (last round) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        rounds = ", ".join(f"{r['images_per_second']:.2f}" for r in results)
        last = results[-1]
        lines.append(
            f"| {name} | {median[name]:.2f} | {median[name] / median['bare']:.3f} | {rounds} | "
            f"{last.get('encoder', '')} | {last.get('stages', '')} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(parser, PROFILES, repeats=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"rows": args.rows} if args.rows else {})}
    if args.child:
        print(json.dumps(run_variant(args.child, settings, Path(args.model), Path(args.work))))
        return
    model = build_model(args.profile, Path(args.models))
    more = ("--rows", str(settings["rows"]))
    runs = run_rounds(
        ("bare", *FORMATS),
        args.repeats,
        lambda name: _child(name, args.profile, model, script=__file__, more=more),
    )
    section = report(args.profile, settings, args.repeats, runs)
    publish(section)


if __name__ == "__main__":
    main()
