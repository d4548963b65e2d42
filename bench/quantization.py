"""model.quantization: its effect on generation speed and on the CLIP score, side by side.

    python bench/quantization.py --profile cpu     # the tiny model and tiny CLIP; writes BENCHMARKS.md
    python bench/quantization.py --profile gpu     # SD-1.5-shaped fp16 pipeline, ViT-L/14-shaped CLIP

One process loads the generator once per method (none, int8_weight_only, int8_dynamic, and fp8 on a
GPU that has it), warms each up, then the methods take turns generating the same prompts with the
same seeds for --repeats rounds; the median images/s is reported. The images of the last round are
scored with the same CLIP scorer the actors use (unquantised, float32), and compared with the
unquantised model's images: mean score, mean |score change| per image, mean |pixel change|.

No real weights can be downloaded here, so both profiles use random weights: speed depends on the
shapes, which are real, but the score change measures how far quantisation moves the output, not
whether a trained model's images get better or worse.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from throughput import (
    _machine,
    build_model,
    no_write_argument,
    prompts,
    publish,
    variant_arguments,
)

from imagemill.core.spec import ScoringSpec
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey
from imagemill.workers.stages.scoring import ClipScorer

PROFILES = {
    "cpu": {"images": 32, "batch_size": 16, "size": 64, "steps": 4, "guidance": 5.0, "dtype": "float32"},
    "gpu": {"images": 256, "batch_size": 16, "size": 512, "steps": 20, "guidance": 7.5, "dtype": "float16"},
}
METHODS = ["none", "int8_weight_only", "int8_dynamic", "fp8"]


def build_clip(profile: str, folder: Path) -> Path:
    target = folder / f"clip-{profile}"
    if (target / "config.json").exists():
        return target
    if profile == "cpu":
        from imagemill.testing.tiny_model import make_tiny_clip

        return make_tiny_clip(target)
    from sd15_shaped import make_clip_l14_shaped

    return make_clip_l14_shaped(target)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate_all(generator: DiffusersGenerator, settings: dict, device: str) -> tuple[torch.Tensor, float]:
    """All the profile's images (on the device) and the seconds they took."""
    texts = prompts(settings["images"])
    size, batch = settings["size"], settings["batch_size"]
    key = BatchKey(size, size, settings["steps"], settings["guidance"])
    _sync(device)
    started = time.perf_counter()
    images = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        seeds = list(range(start, start + len(chunk)))
        images.append(generator.generate(chunk, [None] * len(chunk), seeds, key))
    _sync(device)
    return torch.cat(images), time.perf_counter() - started


def fp8_supported(device: str) -> bool:
    return device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


def measure(settings: dict, model: Path, clip: Path, device: str, repeats: int) -> dict[str, dict]:
    methods = [m for m in METHODS if m != "fp8" or fp8_supported(device)]
    generators = {
        m: DiffusersGenerator(str(model), settings["dtype"], device, quantization=m) for m in methods
    }
    warm = {**settings, "images": settings["batch_size"]}
    for generator in generators.values():
        generate_all(generator, warm, device)
    rates: dict[str, list[float]] = {m: [] for m in methods}
    images: dict[str, torch.Tensor] = {}
    for round_ in range(repeats):
        for method, generator in generators.items():
            images[method], seconds = generate_all(generator, settings, device)
            rates[method].append(settings["images"] / seconds)
            print(f"round {round_ + 1}: {method} {rates[method][-1]:.2f} images/s", flush=True)

    scorer = ClipScorer(ScoringSpec(source=str(clip)), device)
    texts = prompts(settings["images"])
    batch = settings["batch_size"]
    results = {}
    for method in methods:
        _sync(device)
        started = time.perf_counter()
        scores = torch.tensor(
            [
                score
                for i in range(0, len(texts), batch)
                for score in scorer.score(images[method][i : i + batch], texts[i : i + batch])
            ]
        )
        _sync(device)
        score_seconds = time.perf_counter() - started
        if method == "none":
            reference_scores, reference_images = scores, images[method].float()
        results[method] = {
            "images_per_second": statistics.median(rates[method]),
            "rounds": rates[method],
            "mean_score": scores.mean().item(),
            "mean_score_change": (scores - reference_scores).abs().mean().item(),
            "mean_pixel_change": (images[method].float() - reference_images).abs().mean().item(),
            "score_ms_per_image": 1000 * score_seconds / len(texts),
        }
    return results


def report(profile: str, settings: dict, repeats: int, results: dict[str, dict], device: str) -> str:
    base = results["none"]["images_per_second"]
    rows = [
        f"| {method} | {r['images_per_second']:.2f} | {r['images_per_second'] / base:.2f}× | "
        f"{', '.join(f'{x:.2f}' for x in r['rounds'])} | {r['mean_score']:.3f} | "
        f"{r['mean_score_change']:.3f} | {r['mean_pixel_change']:.2f} |"
        for method, r in results.items()
    ]
    skipped = "" if "fp8" in results else " fp8 not run: it needs a CUDA GPU of compute capability 8.9+."
    return "\n".join(
        [
            f"## Quantisation, {profile} profile",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}.",
            f"Reproduce: `python bench/quantization.py --profile {profile} --rows {settings['images']} "
            f"--repeats {repeats}`",
            "",
            f"Settings: {settings['images']} prompts, batch {settings['batch_size']}, "
            f"{settings['size']}² px, "
            f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']}, on {device}; "
            f"medians of {repeats} rounds, methods taking turns; random weights (see bench/quantization.py)."
            f"{skipped}",
            "",
            "| model.quantization | images/s (median) | vs none | all rounds | mean clip_score | "
            "mean abs score change | mean abs pixel change (of 255) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"- Scoring itself (the unquantised CLIP, float32, batches of {settings['batch_size']}): "
            f"{results['none']['score_ms_per_image']:.2f} ms per image.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant_arguments(parser, PROFILES)
    no_write_argument(parser)
    args = parser.parse_args()
    settings = {**PROFILES[args.profile], **({"images": args.rows} if args.rows else {})}
    device = "cuda" if args.profile == "gpu" else "cpu"
    model = build_model(args.profile, Path(args.models))
    clip = build_clip(args.profile, Path(args.models))
    section = report(
        args.profile, settings, args.repeats, measure(settings, model, clip, device, args.repeats), device
    )
    publish(section, write=not args.no_write)


if __name__ == "__main__":
    main()
