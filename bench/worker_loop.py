"""The shard worker's own code in this process (no Ray) beside the bare diffusers loop:

    python bench/worker_loop.py --profile gpu     # SD-1.5-shaped fp16 pipeline; run by bench/gpu.sh
    python bench/worker_loop.py --profile cpu     # the tiny model
    python bench/worker_loop.py --profile gpu-sdxl --formats jpeg --compile both --repeats 3
                                                  # bench/gpu.sh's device-busy matrix (issue #27)

(a) bare: bench/throughput.py's bare loop (in-memory prompts, no I/O, one warm-up call first). (b) the
same prompts, after the same warm-up call on the worker's generator, as a
Parquet file through one `ShardWorker` built in-process (imagemill.testing.in_process): rows read
and validated, generated, encoded by the writer threads (or, for JPEG on CUDA, by nvJPEG on the GPU),
written to local files with metadata and stats, stage by stage, as an actor does; once with PNG,
once with JPEG. This is the part that decides a GPU's throughput; Ray's scheduling overhead is
measured on the CPU profile by bench/throughput.py, whose GPU machine has no Ray. Each variant runs in
its own process; the variants take turns for --repeats rounds and medians are compared. With
`--process one` (bench/gpu.sh, on a device lent for minutes) every variant is loaded and warmed up
once, side by side in this process, each bare loop calling the pipeline of the worker compiled alike,
and the rounds then take turns on them: one start-up, and one load and one compile per compile setting,
instead of one each per variant and round (the CUDA allocator is then shared). The section is written
after every round, so a run stopped at its time limit keeps the rounds it finished.

`--compile on|both`: the same variants with the denoiser compiled (`speed.compile`, `--compile-mode`
reduce-overhead by default: CUDA graphs), the bare loop compiled alike. The bare loop keeps the device
as busy as a loop can, so a variant's images/s ÷ its bare loop's (compiled or not) is the share of the
device's time it keeps busy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from throughput import (
    PROFILES,
    _child,
    _machine,
    bare_loop,
    bench_spec,
    build_model,
    publish,
    variant_arguments,
)

FORMATS = {"imagemill png": "png", "imagemill jpeg": "jpeg"}
COMPILED = " compiled"  # the suffix of a variant run with the denoiser compiled


def worker_shards(
    settings: dict, model: Path, work: Path, image_format: str, compiled: tuple[str, str] | None = None
) -> tuple[Callable[[], dict], Any]:
    """The shard worker, loaded and warmed up by one batch: each call of the first returned runs the
    job's shards once into a fresh output folder and returns its rate and stage seconds; the second is
    its diffusers pipeline."""
    import torch

    from imagemill.testing.in_process import load_worker, run_shards
    from imagemill.workers.generators.contract import BatchKey
    from imagemill.workers.stage_timer import STAGES

    speed = {"compile": True, "compile_backend": compiled[0], "compile_mode": compiled[1]} if compiled else {}
    output = {"path": str(work / "out"), "image_format": image_format}
    spec = bench_spec(settings, work, model, output, {}, speed=speed)
    worker = load_worker(spec)
    # One warm-up call, as the bare loop makes (and as a long-running actor is warm): the first call
    # on a device pays one-time costs (CUDA's lazily loaded kernels, cuDNN/cuBLAS set-up, the caching
    # allocator growing) that are no part of the per-image rate. Without it, a 128-image run charged
    # them to the worker alone.
    size, batch = settings["size"], settings["batch_size"]
    key = BatchKey(size, size, settings["steps"], settings["guidance"])
    worker.generator.generate(["warm-up"] * batch, [None] * batch, list(range(batch)), key)

    def run() -> dict:
        shutil.rmtree(work / "out", ignore_errors=True)  # the last round's shards: written again
        if worker.generator.stage_timer is not None:  # the warm-up's (or a bare loop's on this pipeline)
            worker.generator.stage_timer.take()  # text encode and decode: not the shards'
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

    return run, worker.generator.pipe


def prepared(
    name: str, settings: dict, model: Path, work: Path, compiled: tuple[str, str]
) -> Callable[[], dict]:
    """Variant `name` loaded and warmed up, its work under `work`; each call runs it once."""
    base = name.removesuffix(COMPILED)
    compiled_as = compiled if name.endswith(COMPILED) else None
    if base == "bare":
        return bare_loop(settings, model, compiled_as)
    return worker_shards(settings, model, work, FORMATS[base], compiled_as)[0]


def prepared_together(
    names: list[str], settings: dict, model: Path, work: Path, compiled: tuple[str, str]
) -> dict[str, Callable[[], dict]]:
    """Every variant of `names` loaded and warmed up in this process, the workers first; each bare loop
    runs on the pipeline of a worker compiled alike (one load and one compile per compile setting: the
    same weights, kernels and CUDA graphs, called the bare way); each call runs its variant once."""
    loaded, pipes = {}, {}
    for i, name in enumerate(names):
        if not name.startswith("bare"):
            compiled_as = compiled if name.endswith(COMPILED) else None
            base = name.removesuffix(COMPILED)
            loaded[name], pipes[compiled_as] = worker_shards(
                settings, model, work / str(i), FORMATS[base], compiled_as
            )
    for name in names:
        if name.startswith("bare"):
            compiled_as = compiled if name.endswith(COMPILED) else None
            loaded[name] = bare_loop(settings, model, compiled_as, pipes.get(compiled_as))
    return {name: loaded[name] for name in names}


def variants(formats: list[str], compile: str) -> list[str]:
    """The variants of one run: the bare loop and the worker per format, uncompiled and/or compiled."""
    plain = ["bare", *(f"imagemill {image_format}" for image_format in formats)]
    suffixes = {"off": [""], "on": [COMPILED], "both": ["", COMPILED]}[compile]
    return [f"{name}{suffix}" for suffix in suffixes for name in plain]


def report(
    profile: str, settings: dict, repeats: str, runs: dict[str, list[dict]], command: str, compiled: str
) -> str:
    median = {name: statistics.median(r["images_per_second"] for r in rs) for name, rs in runs.items()}
    heading = f"## Shard worker in-process vs bare loop, {profile} profile"
    lines = [
        heading + (f", compile {compiled}" if compiled else ""),
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `{command}`",
        "",
        f"Settings: {settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']}; one worker in "
        "one process, no Ray (its overhead: the throughput section of the CPU profile); "
        f"medians of {repeats} rounds, variants taking turns. Stage seconds summed over shards "
        "(image_encode and upload are writer-thread time, overlapping the model's, except nvJPEG's).",
        "",
        "| variant | images/s (median) | ÷ bare (device busy share) | all rounds | JPEG encoder | "
        "stage s (last round) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        rounds = ", ".join(f"{r['images_per_second']:.2f}" for r in results)
        last = results[-1]
        bare = median["bare" + (COMPILED if name.endswith(COMPILED) else "")]
        lines.append(
            f"| {name} | {median[name]:.2f} | {median[name] / bare:.3f} | {rounds} | "
            f"{last.get('encoder', '')} | {last.get('stages', '')} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(parser, PROFILES, repeats=2)
    parser.add_argument("--formats", default="png,jpeg", help="the worker's formats, e.g. jpeg")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="speed.compile_mode")
    parser.add_argument("--compile-backend", default="inductor", help="speed.compile_backend")
    parser.add_argument(
        "--process",
        choices=("variant", "one"),
        default="variant",
        help="variant: each variant run in a fresh process; one: every variant loaded, compiled and warmed "
        "up once in this process, the bare loops on the workers' pipelines, then the rounds (bench/gpu.sh)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"rows": args.rows} if args.rows else {})}
    compiled = (args.compile_backend, args.compile_mode)
    if args.child:
        print(json.dumps(prepared(args.child, settings, Path(args.model), Path(args.work), compiled)()))
        return
    model = build_model(args.profile, Path(args.models))
    names = variants(args.formats.split(","), args.compile)
    if args.process == "one":
        loaded = prepared_together(names, settings, model, Path(tempfile.mkdtemp(prefix="bench-")), compiled)
        run_one = lambda name: loaded[name]()  # noqa: E731
    else:
        more = ("--rows", str(settings["rows"]), "--compile-mode", args.compile_mode)
        more += ("--compile-backend", args.compile_backend)
        run_one = lambda name: _child(name, args.profile, model, script=__file__, more=more)  # noqa: E731
    command = " ".join(["python bench/worker_loop.py", *sys.argv[1:]])
    compile_note = (
        "" if args.compile == "off" else f"{args.compile} ({args.compile_backend}, {args.compile_mode})"
    )
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(1, args.repeats + 1):  # the variants take turns, round after round
        for name in names:
            runs[name].append(run_one(name))
            print(f"round {round_}: {name} {runs[name][-1]['images_per_second']:.2f} images/s", flush=True)
        done = f"{round_}" if round_ == args.repeats else f"{round_} (of {args.repeats} asked)"
        publish(report(args.profile, settings, done, runs, command, compile_note))


if __name__ == "__main__":
    main()
