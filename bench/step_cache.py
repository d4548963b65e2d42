"""`speed.cache` on a FLUX-shaped model: each kind's speed and how far its pixels move, side by side:

    python bench/step_cache.py --profile cpu      # a small random FLUX transformer; writes BENCHMARKS.md
    python bench/step_cache.py --profile gpu      # a wider, deeper one in bfloat16 (bench/gpu.sh)

Step caching needs a FLUX model (caching.py), so this is not a variant of bench/speed_options.py,
whose model is SD-shaped. Random weights: the speed depends on shapes only; the pixel change says how
much a kind moves the picture from the uncached one (same seeds), not how good either picture is.
Every variant is a `DiffusersGenerator` in this one process, taking turns batch by batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from throughput import _machine, no_write_argument, prompts, publish, variant_arguments

PROFILES = {
    "cpu": {"rows": 16, "batch_size": 4, "size": 64, "steps": 12, "layers": (2, 4), "dtype": "float32"},
    "gpu": {"rows": 64, "batch_size": 8, "size": 512, "steps": 28, "layers": (8, 16), "dtype": "bfloat16"},
}
VARIANTS = {
    "none": None,
    "first_block": {"kind": "first_block"},
    "pyramid": {"kind": "pyramid"},
    "faster_cache": {"kind": "faster_cache"},
    "taylorseer": {"kind": "taylorseer"},
}


def build_flux(profile: str, folder: Path) -> Path:
    """The tiny FLUX pipeline with a transformer of the profile's depth (random weights)."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    from imagemill.testing.tiny_families import make_tiny_family

    target = folder / f"flux-{profile}"
    if (target / "model_index.json").exists():
        return target
    pipe = DiffusionPipeline.from_pretrained(make_tiny_family("flux", folder / "tiny-flux"))
    double, single = PROFILES[profile]["layers"]
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def main() -> None:
    from imagemill.core.spec import CacheSpec
    from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
    from imagemill.workers.generators.diffusion.speed import SpeedOptions
    from imagemill.workers.rows import BatchKey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(parser, PROFILES)
    no_write_argument(parser)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"rows": args.rows} if args.rows else {})}
    model = build_flux(args.profile, Path(args.models))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = BatchKey(settings["size"], settings["size"], settings["steps"], 3.5)
    batch, texts = settings["batch_size"], prompts(settings["rows"])
    generators = {
        name: DiffusersGenerator(
            str(model),
            settings["dtype"],
            device,
            speed=SpeedOptions(cache=CacheSpec(**cache) if cache else None),
        )
        for name, cache in VARIANTS.items()
    }
    for generator in generators.values():  # warm-up
        generator.generate(texts[:batch], [None] * batch, list(range(batch)), key)
    rates: dict[str, list[float]] = {name: [] for name in generators}
    images: dict[str, list[np.ndarray]] = {name: [] for name in generators}
    for _ in range(args.repeats):
        seconds = dict.fromkeys(generators, 0.0)
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            for name, generator in generators.items():
                started = time.perf_counter()
                made = generator.generate(chunk, [None] * len(chunk), list(range(i, i + len(chunk))), key)
                made = made.cpu().numpy()
                seconds[name] += time.perf_counter() - started
                if len(images[name]) < len(texts) // batch + 1:
                    images[name].append(made)
        for name in generators:
            rates[name].append(len(texts) / seconds[name])
        print(", ".join(f"{name} {rates[name][-1]:.2f}" for name in generators), flush=True)
    base = np.concatenate(images["none"]).astype(float)
    median = {name: statistics.median(values) for name, values in rates.items()}
    lines = [
        f"## Step caching, {args.profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/step_cache.py --profile {args.profile} --rows {settings['rows']} "
        f"--repeats {args.repeats}`",
        "",
        f"Settings: a random FLUX-shaped transformer ({settings['layers'][0]} double, "
        f"{settings['layers'][1]} single blocks), {settings['rows']} prompts, batch {batch}, "
        f"{settings['size']}² px, {settings['steps']} steps, {settings['dtype']}; each kind at its "
        f"defaults in `speed.cache`; medians of {args.repeats} rounds. Pixels: against `none`, same seeds.",
        "",
        "| speed.cache | images/s (median) | × none | mean abs pixel change | PSNR dB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in generators:
        change = np.abs(np.concatenate(images[name]).astype(float) - base)
        mse = (change**2).mean()
        psnr = "∞" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}"
        ratio = median[name] / median["none"]
        lines.append(f"| {name} | {median[name]:.2f} | {ratio:.2f} | {change.mean():.2f} | {psnr} |")
    section = "\n".join([*lines, ""])
    publish(section, write=not args.no_write)


if __name__ == "__main__":
    main()
