"""Actors sharing one GPU (`workers.gpus_per_worker` 1/n): 1, 2 and 4 shard workers of a small model
on one GPU, images/s of them all together:

    python bench/fractional_gpu.py --profile gpu     # SD-1.5-shaped fp16 at 256²; run by bench/gpu.sh
    python bench/fractional_gpu.py --profile cpu     # the tiny model, on the CPU (a dry run)

What Ray does for actors of `num_gpus: 1/n` is start n processes that see the same GPU; each caps its
CUDA allocator at its share (imagemill.workers.batch_fit.keep_to_gpu_share, from the spec's
`gpus_per_worker`). The GPU machine has no Ray, so this starts the n processes itself: each builds a
`ShardWorker` in-process (imagemill.testing.in_process) with `gpus_per_worker: 1/n` and its own
Parquet file of rows ÷ n prompts, warms up, and waits; all start at once, and the rate is the rows of
all of them over the wall-clock from the start to the last one's end. A small model leaves a GPU
partly idle between kernels and during host work (reading, encoding); sharing fills that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from throughput import MODELS_DIR, _machine, _pythonpath, bench_spec, build_model, publish, run_rounds

ACTORS = (1, 2, 4)
PROFILES = {  # a small model's load: a GPU it does not fill alone
    "cpu": {"rows": 64, "batch_size": 8, "size": 64, "steps": 4, "guidance": 5.0, "dtype": "float32"},
    "gpu": {"rows": 512, "batch_size": 8, "size": 256, "steps": 20, "guidance": 7.5, "dtype": "float16"},
}


def run_one_actor(settings: dict, share: int, model: Path, work: Path) -> None:
    """One of `share` actors on the GPU: load, warm up, say `ready`, wait for a line on stdin, run its
    rows, print its result as JSON."""
    import torch

    from imagemill.testing.in_process import load_worker, run_shards
    from imagemill.workers.generators.contract import BatchKey

    spec = bench_spec(settings, work, model, {"path": str(work / "out")}, {"gpus_per_worker": 1 / share})
    worker = load_worker(spec)
    size, batch = settings["size"], settings["batch_size"]
    key = BatchKey(size, size, settings["steps"], settings["guidance"])
    worker.generator.generate(["warm-up"] * batch, [None] * batch, list(range(batch)), key)
    if worker.device == "cuda":
        torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()
    stats = run_shards(worker)
    peak = torch.cuda.max_memory_allocated() / 2**30 if worker.device == "cuda" else 0.0
    print(json.dumps({"ok": sum(s.ok for s in stats), "peak_gib": round(peak, 2)}), flush=True)


def run_actors(share: int, profile: str, model: Path, rows: int) -> dict:
    """`share` actor processes on the one GPU, started together; their images/s together."""
    with tempfile.TemporaryDirectory(prefix=f"bench-share-{share}-") as work:
        children = []
        for index in range(share):
            folder = Path(work, str(index))
            folder.mkdir()
            command = [sys.executable, __file__, "--child", str(share), "--profile", profile]
            command += ["--model", str(model), "--work", str(folder), "--rows", str(rows // share)]
            children.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _pythonpath()},
                )
            )
        for child in children:  # every actor loaded and warm before any starts
            _next_line(child, "ready")
        started = time.perf_counter()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [json.loads(_next_line(child, "{")) for child in children]
        seconds = time.perf_counter() - started
        if any(child.wait() != 0 for child in children):
            raise RuntimeError(f"an actor of {share} failed")
    images = sum(result["ok"] for result in results)
    return {"images_per_second": images / seconds, "peak_gib": max(r["peak_gib"] for r in results)}


def _next_line(child: subprocess.Popen, starts: str) -> str:
    """The child's next line of stdout that starts with `starts` (a library may print others)."""
    for line in child.stdout:
        if line.startswith(starts):
            return line
    raise RuntimeError(f"an actor process ended (exit {child.wait()}) before printing {starts!r}")


def report(profile: str, settings: dict, repeats: int, runs: dict[str, list[dict]]) -> str:
    median = {name: statistics.median(r["images_per_second"] for r in rs) for name, rs in runs.items()}
    one = median[_name(1)]
    lines = [
        f"## Actors sharing one GPU (gpus_per_worker 1/n), {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/fractional_gpu.py --profile {profile} --rows {settings['rows']} "
        f"--repeats {repeats}`",
        "",
        f"Settings: {settings['rows']} prompts split evenly over the actors, batch {settings['batch_size']}, "
        f"{settings['size']}² px, {settings['steps']} steps, {settings['dtype']}; each actor a process "
        "with a `ShardWorker` in-process and its allocator capped at 1/n of the GPU (as under Ray's "
        f"fractional GPUs; no Ray here), all started together after loading; medians of {repeats} rounds.",
        "",
        "| actors on the GPU | images/s together (median) | ÷ 1 actor | all rounds | peak GiB per actor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        rounds = ", ".join(f"{r['images_per_second']:.2f}" for r in results)
        peak = max(r["peak_gib"] for r in results)
        lines.append(f"| {name} | {median[name]:.2f} | {median[name] / one:.2f} | {rounds} | {peak} |")
    return "\n".join([*lines, ""])


def _name(share: int) -> str:
    return f"{share} ({1 / share:g} GPU each)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, help="prompts in all (default: the profile's)")
    parser.add_argument("--models", default=MODELS_DIR)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"rows": args.rows} if args.rows else {})}
    if args.child:
        run_one_actor(settings, args.child, Path(args.model), Path(args.work))
        return
    model = build_model(args.profile, Path(args.models))
    runs = run_rounds(
        [_name(share) for share in ACTORS],
        args.repeats,
        lambda name: run_actors(int(name.split()[0]), args.profile, model, settings["rows"]),
    )
    publish(report(args.profile, settings, args.repeats, runs))


if __name__ == "__main__":
    main()
