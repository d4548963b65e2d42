"""model.offload: what each mode costs in speed, and what memory it needs, under a memory cap.

    python bench/offload.py --profile gpu     # SD-1.5-shaped fp16 pipeline on one CUDA GPU
    python bench/offload.py --profile cpu     # the tiny model: the plumbing only (offload is a no-op on CPU)

On a GPU, `none` runs first without a cap: its images/s and its peak memory. Then the process's memory
is capped (`torch.cuda.set_per_process_memory_fraction`) at --cap times that peak, so the model no
longer fits, and each mode (none again, model, group, sequential) loads afresh and generates the same
prompts under the cap: its images/s and peak memory, or "out of memory". Random weights: speed and
memory depend on the shapes, which are real.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from throughput import MODELS_DIR, _machine, build_model, no_write_argument, prompts, publish

from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey

PROFILES = {
    "cpu": {"images": 8, "batch_size": 4, "size": 64, "steps": 4, "guidance": 5.0, "dtype": "float32"},
    "gpu": {"images": 32, "batch_size": 8, "size": 512, "steps": 20, "guidance": 7.5, "dtype": "float16"},
}
MODES = ["none", "model", "group", "sequential"]


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_mode(mode: str, settings: dict, model: Path, device: str) -> dict:
    """Load the generator with `mode`, warm it up with one batch, then time the profile's images."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator = None
    try:
        generator = DiffusersGenerator(str(model), settings["dtype"], device, offload=mode)
        texts, batch = prompts(settings["images"]), settings["batch_size"]
        key = BatchKey(settings["size"], settings["size"], settings["steps"], settings["guidance"])
        warm = texts[:batch]
        generator.generate(warm, [None] * len(warm), list(range(len(warm))), key)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            generator.generate(chunk, [None] * len(chunk), list(range(start, start + len(chunk))), key)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = len(texts) / (time.perf_counter() - started)
        result = {"images_per_second": rate, "peak_gib": _peak_gib(device)}
    except torch.OutOfMemoryError:
        result = {"images_per_second": None, "peak_gib": _peak_gib(device)}
    del generator
    gc.collect()
    print(f"{mode}: {result}", flush=True)
    return result


def measure(settings: dict, model: Path, device: str, cap: float) -> tuple[dict, dict, float | None]:
    """`none` uncapped, then every mode under the cap (GPU); on CPU every mode uncapped."""
    free = run_mode("none", settings, model, device)
    capped_gib = None
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        capped_gib = cap * free["peak_gib"]
        torch.cuda.set_per_process_memory_fraction(capped_gib * 2**30 / total)
    return free, {mode: run_mode(mode, settings, model, device) for mode in MODES}, capped_gib


def report(profile: str, settings: dict, cap: float, results: tuple, device: str) -> str:
    free, capped, capped_gib = results

    def row(name: str, result: dict) -> str:
        rate = result["images_per_second"]
        peak = "—" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
        speed = "out of memory" if rate is None else f"{rate:.2f}"
        ratio = "—" if rate is None else f"{rate / free['images_per_second']:.2f}×"
        return f"| {name} | {speed} | {ratio} | {peak} |"

    limit = f"capped at {capped_gib:.2f} GiB ({cap}× none's peak)" if capped_gib else "no cap (CPU)"
    return "\n".join(
        [
            f"## Offload, {profile} profile",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}.",
            f"Reproduce: `python bench/offload.py --profile {profile} --rows {settings['images']} "
            f"--cap {cap}`",
            "",
            f"Settings: {settings['images']} prompts, batch {settings['batch_size']}, "
            f"{settings['size']}² px, {settings['steps']} steps, {settings['dtype']}, on {device}; "
            f"one round each after a warm-up batch; memory {limit}. On CPU offloading is not applied "
            "(nothing to offload to): the rows show the plumbing, not a cost.",
            "",
            "| model.offload | images/s | vs none uncapped | peak GiB allocated |",
            "| --- | --- | --- | --- |",
            row("none, no cap", free),
            *(row(mode, result) for mode, result in capped.items()),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--rows", type=int, help="prompts per mode (default: the profile's)")
    parser.add_argument("--models", default=MODELS_DIR)
    parser.add_argument("--cap", type=float, default=0.6, help="the memory cap, times none's peak")
    no_write_argument(parser)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"images": args.rows} if args.rows else {})}
    device = "cuda" if args.profile == "gpu" else "cpu"
    model = build_model(args.profile, Path(args.models))
    results = measure(settings, model, device, args.cap)
    publish(report(args.profile, settings, args.cap, results, device), write=not args.no_write)


if __name__ == "__main__":
    main()
