"""Prompt expansion's cost: images/s without expansion, with it on the workers, and with an expander pool.

    python bench/expansion.py --repeats 3        # cpu profile: the tiny SD model, a small random Llama

Each variant is an imagemill run (bench/throughput.py's `run_imagemill`) in its own process, the
variants taking turns. Per variant it reports the images/s over the generation window and the share of
the workers' time spent on expansion (`expand_seconds` in the shard stats: running it with placement
`actor`, waiting for the pool with `pool`). With `actor` that share is expansion's cost; with `pool`
it is how long the generator went unfed, which the pool's batches, started ahead, keep small.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

from throughput import (
    MODELS_DIR,
    PROFILES,
    _child,
    _machine,
    build_model,
    publish,
    run_imagemill,
)

PROFILE = "cpu"
LM = {"hidden_size": 128, "num_layers": 4}  # a few hundred thousand parameters: small next to the UNet
EXPANSION = {"max_new_tokens": 32, "do_sample": True, "temperature": 0.9, "batch_size": 16}
VARIANTS = {
    "none": None,
    "actor": {"placement": "actor"},
    "pool": {"placement": "pool", "num_workers": 1, "num_cpus": 1},
}


def build_lm(folder: Path) -> Path:
    target = folder / "lm-cpu"
    if (target / "config.json").exists():
        return target
    from imagemill.testing.tiny_lm import make_tiny_lm

    return make_tiny_lm(target, **LM)


def run_variant(name: str, model: Path, lm: Path, work: Path) -> dict:
    placement = VARIANTS[name]
    extra = None if placement is None else {"expansion": {"source": str(lm), **EXPANSION, **placement}}
    result = run_imagemill(PROFILES[PROFILE], model, work, extra)
    stages = result["stages"]
    result["expand_share"] = stages.get("expand", 0.0) / stages["total"]
    return result


def _report(repeats: int, runs: dict[str, list[dict]], lm_parameters: int) -> str:
    settings = PROFILES[PROFILE]

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    base = median("none", "images_per_second")
    rows = [
        f"| {name} | {median(name, 'images_per_second'):.2f} "
        f"| {median(name, 'images_per_second') / base:.3f} | {100 * median(name, 'expand_share'):.1f}% | "
        f"{', '.join(format(run['images_per_second'], '.2f') for run in runs[name])} |"
        for name in runs
    ]
    stages = {name: runs[name][len(runs[name]) // 2]["stages"] for name in runs}
    lines = [
        f"## Prompt expansion, {PROFILE} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/expansion.py --repeats {repeats}`",
        "",
        f"Settings: as the throughput cpu profile ({settings['rows']} prompts, "
        f"batch {settings['batch_size']}, {settings['size']}² px, {settings['steps']} steps, "
        f"{settings['workers']} workers); expansion by a "
        f"random-weight Llama of {lm_parameters:,} parameters ({LM['num_layers']} layers, width "
        f"{LM['hidden_size']}), {EXPANSION['max_new_tokens']} new tokens sampled per prompt, "
        f"{EXPANSION['batch_size']} prompts per call; the pool is one expander on one CPU. "
        f"Medians of {repeats} rounds, variants taking turns.",
        "",
        "| expansion | images/s (median) | ÷ none | workers' time on expansion | all rounds |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"- Stage seconds summed over shards (median round): {stages}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=MODELS_DIR)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=[PROFILE], default=PROFILE, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--lm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, Path(args.model), Path(args.lm), Path(args.work))))
        return
    model, lm = build_model(PROFILE, Path(args.models)), build_lm(Path(args.models))
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(args.repeats):
        for name in VARIANTS:
            runs[name].append(_child(name, PROFILE, model, __file__, ("--lm", str(lm))))
            result = runs[name][-1]
            print(
                f"round {round_ + 1}: {name} {result['images_per_second']:.2f} images/s, "
                f"expansion {100 * result['expand_share']:.1f}% of the workers' time",
                flush=True,
            )
    from safetensors import safe_open

    with safe_open(str(lm / "model.safetensors"), "pt") as weights:
        names = weights.keys()
        lm_parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    section = _report(args.repeats, runs, lm_parameters)
    publish(section)


if __name__ == "__main__":
    main()
