"""Each `speed:` option's effect on the model loop, side by side, through imagemill's own generator:

    python bench/speed_options.py --profile cpu      # the tiny model; writes BENCHMARKS.md
    python bench/speed_options.py --profile gpu      # the SD-1.5-shaped pipeline, random fp16 weights

Every variant (baseline, then one option changed) runs in its own process: the model is loaded with
the option applied (compile: its warm-up batch at load time), one more batch warms up, then the
prompts are generated batch by batch with `DiffusersGenerator.generate`, as an actor does, without
Parquet or image writing. The variants take turns for --repeats rounds; medians are compared with
the baseline's. Only these ratios mean anything on a shared machine, not the absolute rates.
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

from throughput import _machine, build_model, prompts, write_benchmarks

PROFILES = {
    "cpu": {"rows": 48, "batch_size": 8, "size": 64, "steps": 4, "guidance": 5.0, "dtype": "float32"},
    "gpu": {"rows": 256, "batch_size": 8, "size": 512, "steps": 20, "guidance": 7.5, "dtype": "float16"},
}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "dtype=bfloat16": {"dtype": "bfloat16"},
    "attention=eager": {"attention": "eager"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "tiny_vae": {"tiny_vae": True},
}


def _tiny_vae(profile: str, folder: Path) -> Path:
    """A random-weight TAESD-family decoder for the profile's model: speed depends on shapes only."""
    target = folder / f"tiny-vae-{profile}"
    if (target / "config.json").exists():
        return target
    if profile == "cpu":
        from imagemill.workers.tiny_model import make_tiny_autoencoder

        return make_tiny_autoencoder(target)
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(target, safe_serialization=True)  # TAESD's own shapes, 8x
    return target


def run_variant(settings: dict, change: dict, model: Path, tiny_vae: Path) -> dict:
    import torch

    from imagemill.workers.diffusers_generator import DiffusersGenerator
    from imagemill.workers.rows import BatchKey
    from imagemill.workers.speed import SpeedOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, key = (
        settings["batch_size"],
        BatchKey(settings["size"], settings["size"], settings["steps"], settings["guidance"]),
    )
    options = SpeedOptions(
        attention=change.get("attention", "sdpa"),
        channels_last=change.get("channels_last", False),
        compile_batch=batch if change.get("compile") else None,
        warm_up=key if change.get("compile") else None,
        tiny_vae=str(tiny_vae) if change.get("tiny_vae") else None,
    )
    started = time.perf_counter()
    generator = DiffusersGenerator(str(model), change.get("dtype", settings["dtype"]), device, speed=options)
    load_seconds = time.perf_counter() - started
    texts = prompts(settings["rows"] + batch)
    generator.generate(texts[-batch:], [None] * batch, list(range(batch)), key).cpu()  # warm-up
    generator.stage_timer.take()
    started = time.perf_counter()
    for i in range(0, settings["rows"], batch):
        chunk = texts[i : i + batch]
        generator.generate(chunk, [None] * len(chunk), list(range(i, i + len(chunk))), key).cpu()
    seconds = time.perf_counter() - started
    stages = generator.stage_timer.take()
    stages["denoise"] = seconds - sum(stages.values())
    return {
        "images_per_second": settings["rows"] / seconds,
        "load_seconds": load_seconds,
        "stages": {stage: round(value, 2) for stage, value in stages.items()},
    }


def _child(name: str, profile: str, model: Path, tiny_vae: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--profile",
            profile,
            "--child",
            name,
            "--model",
            str(model),
            "--tiny-vae",
            str(tiny_vae),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(profile: str, settings: dict, repeats: int, runs: dict[str, list[dict]]) -> str:
    median = {
        name: statistics.median(r["images_per_second"] for r in results) for name, results in runs.items()
    }
    lines = [
        f"## Speed options, {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, shared with other jobs at the time.",
        f"Reproduce: `python bench/speed_options.py --profile {profile} --repeats {repeats}`",
        "",
        f"Settings: {settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']} unless changed; "
        f"the generator loop alone, each variant in its own process, medians of {repeats} rounds in turns.",
        "",
        "| variant | images/s (median) | × baseline | all rounds | load s (median) | stage s, median round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        middle = sorted(results, key=lambda r: r["images_per_second"])[len(results) // 2]
        rounds = ", ".join(f"{r['images_per_second']:.2f}" for r in results)
        load = statistics.median(r["load_seconds"] for r in results)
        ratio = median[name] / median["baseline"]
        lines.append(
            f"| {name} | {median[name]:.2f} | {ratio:.2f} | {rounds} | {load:.1f} | {middle['stages']} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", nargs="*", choices=VARIANTS, help="variants to run (baseline is always run)"
    )
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "imagemill-bench-models"))
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tiny-vae", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = PROFILES[args.profile]
    if args.child:
        print(json.dumps(run_variant(settings, VARIANTS[args.child], Path(args.model), Path(args.tiny_vae))))
        return
    model = build_model(args.profile, Path(args.models))
    tiny_vae = _tiny_vae(args.profile, Path(args.models))
    names = ["baseline", *(name for name in args.only or VARIANTS if name != "baseline")]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names:
            runs[name].append(_child(name, args.profile, model, tiny_vae))
            print(
                f"round {round_ + 1}: {name} {runs[name][-1]['images_per_second']:.2f} images/s", flush=True
            )
    section = _report(args.profile, settings, args.repeats, runs)
    print(section)
    if not args.no_write:
        write_benchmarks(section)


if __name__ == "__main__":
    main()
