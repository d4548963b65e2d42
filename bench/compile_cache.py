"""`speed.compile_cache`: an actor's time from start to first image, compiling itself or loading what
an earlier actor compiled, side by side in one run:

    python bench/compile_cache.py                  # the CPU profile's tiny model; writes BENCHMARKS.md

Each actor is a fresh Python process (imports included in its time) with a fresh, empty Inductor
cache folder of its own, as on a node that just joined; it loads the model with `speed.compile: true`
(inductor; its load-time warm-up compiles) and generates one batch. Per round, three actors in turn:
`no compile_cache`; `first actor` (an empty compile_cache: compiles, then saves); `later actor`
(that compile_cache: loads instead of compiling). The first two should take about as long. The
actors share a signing key of this run's own (IMAGEMILL_COMPILE_CACHE_KEY), so the later one's time
includes checking the artifact's signature.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from throughput import (
    MODELS_DIR,
    _machine,
    build_model,
    no_write_argument,
    prompts,
    publish,
)

SETTINGS = {"batch_size": 4, "size": 64, "steps": 4, "guidance": 5.0}
VARIANTS = ("no compile_cache", "first actor", "later actor")


def actor(model: str, compile_cache: str | None) -> None:
    """One actor: load with compile (and the compile cache), first image; prints its seconds."""
    started = time.perf_counter()
    import imagemill
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions
    from imagemill.workers.rows import BatchKey

    spec = imagemill.build_spec(
        {
            "input": {"path": "/tmp/unused"},
            "output": {"path": "/tmp/unused-out"},
            "model": {"source": model},
            "generation": {"width": SETTINGS["size"], "height": SETTINGS["size"]},
            "workers": {"batch_size": SETTINGS["batch_size"]},
            "speed": {"compile": True, **({"compile_cache": compile_cache} if compile_cache else {})},
        }
    )
    generator = DiffusersGenerator(model, "float32", "cpu", speed=SpeedOptions.from_spec(spec))
    batch = SETTINGS["batch_size"]
    key = BatchKey(SETTINGS["size"], SETTINGS["size"], SETTINGS["steps"], SETTINGS["guidance"])
    generator.generate(prompts(batch), [None] * batch, list(range(batch)), key).cpu()
    print(json.dumps({"seconds": time.perf_counter() - started}))


def _spawn(model: Path, compile_cache: Path | None, work: Path, signing: dict[str, str]) -> float:
    inductor = tempfile.mkdtemp(dir=work, prefix="inductor-")  # a node's own, empty Inductor cache
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor, "HF_HUB_OFFLINE": "1", **signing}
    command = [sys.executable, __file__, "--child", str(model)]
    command += ["--cache", str(compile_cache)] if compile_cache else []
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    inner = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
    print(f"  {wall:.1f} s wall, {inner:.1f} s from the first import to the first image", flush=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=MODELS_DIR)
    no_write_argument(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        actor(args.child, args.cache)
        return
    from imagemill.core.compile_cache_key import KEY_VARIABLE  # here: a child's imports are timed

    model = build_model("cpu", Path(args.models))
    signing = {KEY_VARIABLE: secrets.token_hex(32)}  # the artifacts' signing key, this run's own
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.repeats):
            cache = Path(work) / f"compile-cache-{round_}"  # empty for this round's first actor
            for name, location in zip(VARIANTS, (None, cache, cache), strict=True):
                print(f"round {round_ + 1}: {name}", flush=True)
                seconds[name].append(_spawn(model, location, Path(work), signing))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lines = [
        "## Compile cache, cpu profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/compile_cache.py --repeats {args.repeats}`",
        "",
        f"Settings: the CPU profile's tiny model, `speed.compile: true` (inductor), batch "
        f"{SETTINGS['batch_size']}, {SETTINGS['size']}² px, {SETTINGS['steps']} steps. Each actor a fresh "
        "process with an empty Inductor cache of its own; seconds from process start to its first batch "
        f"of images; medians of {args.repeats} rounds.",
        "",
        "| actor | start to first image, s (median) | × no compile_cache | all rounds |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in seconds.items():
        rounds = ", ".join(f"{value:.1f}" for value in values)
        ratio = median[name] / median["no compile_cache"]
        lines.append(f"| {name} | {median[name]:.1f} | {ratio:.2f} | {rounds} |")
    section = "\n".join([*lines, ""])
    publish(section, write=not args.no_write)


if __name__ == "__main__":
    main()
