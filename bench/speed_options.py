"""Each `speed:` option's effect on the model loop, side by side, through imagemill's own generator:

    python bench/speed_options.py --profile cpu      # the tiny model; writes BENCHMARKS.md
    python bench/speed_options.py --profile gpu      # the SD-1.5-shaped pipeline, random fp16 weights

Every variant (baseline, then one option changed) is a `DiffusersGenerator` of its own in this one
process, loaded with the option applied (compile: its warm-up batch at load time) and warmed up by
one more batch. The prompts are then generated batch by batch with `generate`, as an actor does,
without Parquet or image writing, each batch by every variant in turn, for --repeats rounds;
medians are compared with the baseline's. Taking turns batch by batch spreads a shared machine's
bursts of load over all variants alike: only these ratios mean anything, not the absolute rates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from throughput import (
    _machine,
    build_model,
    no_write_argument,
    prompts,
    publish,
    variant_arguments,
)

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
        from imagemill.testing.tiny_model import make_tiny_autoencoder

        return make_tiny_autoencoder(target)
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(target, safe_serialization=True)  # TAESD's own shapes, 8x
    return target


def load_variant(settings: dict, change: dict, model: Path, tiny_vae: Path) -> tuple[Any, float]:
    """The generator with one option changed, warmed up; and its load time (compiling included)."""
    import torch

    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions

    batch, key = settings["batch_size"], _key(settings)
    options = SpeedOptions(
        attention=change.get("attention", "sdpa"),
        channels_last=change.get("channels_last", False),
        compile_batch=batch if change.get("compile") else None,
        warm_up=key if change.get("compile") else None,
        tiny_vae=str(tiny_vae) if change.get("tiny_vae") else None,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    generator = DiffusersGenerator(str(model), change.get("dtype", settings["dtype"]), device, speed=options)
    load_seconds = time.perf_counter() - started
    warm = prompts(batch)
    generator.generate(warm, [None] * batch, list(range(batch)), key).cpu()
    generator.stage_timer.take()
    return generator, load_seconds


def _key(settings: dict) -> Any:
    from imagemill.workers.rows import BatchKey

    return BatchKey(settings["size"], settings["size"], settings["steps"], settings["guidance"])


def measure(settings: dict, names: list[str], model: Path, tiny_vae: Path, repeats: int) -> dict[str, list]:
    """Per variant and round: images/s and stage seconds. Batches go to the variants in turn, so a
    burst of load from other jobs on a shared machine falls on all of them alike."""
    loaded = {name: load_variant(settings, VARIANTS[name], model, tiny_vae) for name in names}
    batch, key, texts = settings["batch_size"], _key(settings), prompts(settings["rows"])
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(repeats):
        seconds = dict.fromkeys(names, 0.0)
        for i in range(0, len(texts), batch):
            chunk, seeds = texts[i : i + batch], list(range(i, i + batch))
            for name, (generator, _) in loaded.items():
                started = time.perf_counter()
                generator.generate(chunk, [None] * len(chunk), seeds[: len(chunk)], key).cpu()
                seconds[name] += time.perf_counter() - started
        for name, (generator, load_seconds) in loaded.items():
            stages = generator.stage_timer.take()
            stages["denoise"] = seconds[name] - sum(stages.values())
            runs[name].append(
                {
                    "images_per_second": len(texts) / seconds[name],
                    "load_seconds": load_seconds,
                    "stages": {stage: round(value, 2) for stage, value in stages.items()},
                }
            )
        print(", ".join(f"{name} {runs[name][-1]['images_per_second']:.2f}" for name in names), flush=True)
    return runs


def _report(profile: str, settings: dict, repeats: int, runs: dict[str, list[dict]]) -> str:
    median = {
        name: statistics.median(r["images_per_second"] for r in results) for name, results in runs.items()
    }
    lines = [
        f"## Speed options, {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/speed_options.py --profile {profile} --rows {settings['rows']} "
        f"--repeats {repeats}`",
        "",
        f"Settings: {settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']} unless changed; "
        "the generator loop alone, all variants in one process taking turns batch by batch; "
        f"medians of {repeats} rounds.",
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
    variant_arguments(parser, PROFILES)
    parser.add_argument(
        "--only", nargs="*", choices=VARIANTS, help="variants to run (baseline is always run)"
    )
    no_write_argument(parser)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"rows": args.rows} if args.rows else {})}
    model = build_model(args.profile, Path(args.models))
    tiny_vae = _tiny_vae(args.profile, Path(args.models))
    names = ["baseline", *(name for name in args.only or VARIANTS if name != "baseline")]
    runs = measure(settings, names, model, tiny_vae, args.repeats)
    section = _report(args.profile, settings, args.repeats, runs)
    publish(section, write=not args.no_write)


if __name__ == "__main__":
    main()
