"""Throughput side by side, on one machine, one model, one batch size and one image size:

  (a) bare:      one process calling the diffusers pipeline back to back on in-memory prompts, no I/O
  (b) imagemill: Parquet in, images and metadata out, through Ray actors
  (c) ray-data:  Ray's documented batch inference: read_parquet → map_batches(callable class, actor
                 pool) → write_images

    python bench/throughput.py --profile cpu            # the tiny model; writes BENCHMARKS.md
    python bench/throughput.py --profile gpu            # an SD-1.5-shaped pipeline, random fp16 weights
    python bench/throughput.py --profile cpu --stages   # (b) once: where its time goes, stage by stage

Each variant runs in its own process, the three take turns for --repeats rounds, and the medians are
compared: the machines are shared and noisy, so only ratios measured side by side mean anything.
For (b) two rates are given: over the whole run (actor start-up and model load included, as for
(c)), and over the generation window (first shard started to last shard committed), the rate to
compare with (a), which excludes its model load too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from imagemill.core.spec import JobSpec

_SHAPED = {"workers": 1, "dtype": "float16", "gpu": True}
_TINY = {"workers": 1, "dtype": "float32", "gpu": False}
PROFILES = {
    "cpu": {
        "rows": 384,
        "batch_size": 16,
        "workers": 2,
        "size": 64,
        "steps": 8,
        "guidance": 5.0,
        "dtype": "float32",
        "gpu": False,
    },
    "gpu": {
        "rows": 2048,
        "batch_size": 16,
        "workers": 1,
        "size": 512,
        "steps": 20,
        "guidance": 7.5,
        "dtype": "float16",
        "gpu": True,
    },
    # bench/gpu.sh's device-busy matrix (issue #27): SDXL-shaped at 1024², and a few-step model (SD-1.5-
    # shaped at 4 steps without guidance, as SD-Turbo-like models run); the cpu-* ones are their dry runs
    "gpu-sdxl": {**_SHAPED, "rows": 32, "batch_size": 4, "size": 1024, "steps": 20, "guidance": 5.0},
    "gpu-fewstep": {**_SHAPED, "rows": 512, "batch_size": 16, "size": 512, "steps": 4, "guidance": 0.0},
    "cpu-sdxl": {**_TINY, "rows": 8, "batch_size": 4, "size": 64, "steps": 2, "guidance": 5.0},
    "cpu-fewstep": {**_TINY, "rows": 16, "batch_size": 8, "size": 64, "steps": 2, "guidance": 0.0},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "ring"]


def prompts(rows: int) -> list[str]:
    return [f"a {COLOURS[i % 8]} {SHAPES[(i // 8) % 6]} number {i}" for i in range(rows)]


def build_model(profile: str, folder: Path) -> Path:
    shared = {"cpu-fewstep": "cpu", "gpu-fewstep": "gpu"}  # the same model, run with fewer steps
    target = folder / f"model-{shared.get(profile, profile)}"
    if (target / "model_index.json").exists():
        return target
    if profile == "cpu-sdxl":
        from imagemill.testing.tiny_families import make_tiny_sdxl

        return make_tiny_sdxl(target)
    if profile.startswith("cpu"):
        from imagemill.testing.tiny_model import make_tiny_model

        return make_tiny_model(target)
    if profile == "gpu-sdxl":
        from sdxl_shaped import make_sdxl_shaped_model

        return make_sdxl_shaped_model(target)
    from sd15_shaped import make_sd15_shaped_model

    return make_sd15_shaped_model(target)


# --- the three variants, each run in a child process -------------------------------------------------


def run_bare(settings: dict, model: Path, work: Path, compiled: tuple[str, str] | None = None) -> dict:
    """The bare loop, loaded, warmed up and run once."""
    return bare_loop(settings, model, compiled)()


def bare_loop(
    settings: dict, model: Path, compiled: tuple[str, str] | None = None, pipe: Any = None
) -> Callable[[], dict]:
    """The bare loop, loaded and warmed up by one batch: each call runs the profile's prompts once and
    returns its rate. `compiled`: (backend, mode) to torch.compile its denoiser with, as the worker's
    `speed.compile` does (static shapes: every batch is full here). `pipe`: a pipeline already on the
    device (and compiled alike), run instead of loading one (bench/worker_loop.py --process one)."""
    import torch
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if pipe is None:
        pipe = DiffusionPipeline.from_pretrained(
            model, dtype=getattr(torch, settings["dtype"]), use_safetensors=True
        )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if compiled is not None:
            denoiser = getattr(pipe, "unet", None) or pipe.transformer
            denoiser.compile(backend=compiled[0], mode=compiled[1], dynamic=False)
    texts, size, batch = prompts(settings["rows"]), settings["size"], settings["batch_size"]

    def call(chunk: list[str], first_seed: int) -> None:
        pipe(
            prompt=chunk,
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"],
            width=size,
            height=size,
            generator=[torch.Generator("cpu").manual_seed(first_seed + i) for i in range(len(chunk))],
            output_type="pt",
        )

    call(texts[:batch], 0)  # warm-up, as a long-running actor is warm

    def run() -> dict:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            call(texts[i : i + batch], i)
        if device == "cuda":
            torch.cuda.synchronize()
        return {
            "images_per_second": len(texts) / (time.perf_counter() - started),
            "torch_threads": torch.get_num_threads(),
        }

    return run


def bench_spec(
    settings: dict, work: Path, model: Path, output: dict, workers: dict, **sections: dict
) -> JobSpec:
    """The benches' job on `model`: the profile's prompts (written under `work`), image size, steps,
    guidance and batch size; `output`, `workers` (added to the batch size) and `sections` are what a
    bench varies."""
    import imagemill

    return imagemill.build_spec(
        {
            "input": {"path": str(_write_input(settings, work)), "rows_per_shard": 64},
            "output": output,
            "model": {"source": str(model), "dtype": settings["dtype"]},
            "generation": {
                "width": settings["size"],
                "height": settings["size"],
                "num_inference_steps": settings["steps"],
                "guidance_scale": settings["guidance"],
            },
            "workers": {"batch_size": settings["batch_size"], **workers},
            **sections,
        }
    )


def _write_input(settings: dict, work: Path) -> Path:
    folder = work / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    texts = prompts(settings["rows"])
    table = pa.table({"id": [f"p{i:06d}" for i in range(len(texts))], "prompt": texts})
    pq.write_table(table, folder / "prompts.parquet", row_group_size=64)
    return folder


def run_imagemill(settings: dict, model: Path, work: Path, extra: dict | None = None) -> dict:
    """`extra`: more spec sections (bench/expansion.py adds `expansion`)."""
    import ray

    import imagemill
    from imagemill.core.layout import OutputLayout
    from imagemill.core.records import committed_shards
    from imagemill.workers.stage_timer import STAGES

    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False)  # as (c): room for Ray's own tasks
    output = work / "imagemill-out"
    spec = bench_spec(
        settings, work, model, {"path": str(output)}, {"num_workers": settings["workers"]}, **(extra or {})
    )
    started = time.perf_counter()
    result = imagemill.run(spec, progress=False)
    wall = time.perf_counter() - started
    stats = list(committed_shards(OutputLayout(str(output))).values())
    finished = [datetime.fromisoformat(s.finished_at).timestamp() for s in stats]
    window = max(finished) - min(end - s.seconds for end, s in zip(finished, stats, strict=True))
    stages = {stage: round(sum(s.stage_seconds[stage] for s in stats), 2) for stage in STAGES}
    stages["generate"] = round(sum(s.model_seconds for s in stats), 2)
    stages["write_wait"] = round(sum(s.write_wait_seconds for s in stats), 2)
    if stats[0].expand_seconds is not None:  # only jobs with prompt expansion
        stages["expand"] = round(sum(s.expand_seconds for s in stats), 2)
    stages["total"] = round(sum(s.seconds for s in stats), 2)
    return {
        "images_per_second": result.ok / window,
        "wall_images_per_second": result.ok / wall,
        "stages": stages,
        "ok": result.ok,
    }


class RayDataPredictor:
    """The callable class of Ray's batch-inference guide: load once, generate a batch per call."""

    def __init__(self, model: str, settings: dict):
        import torch
        from diffusers import DiffusionPipeline

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = DiffusionPipeline.from_pretrained(
            model, dtype=getattr(torch, settings["dtype"]), use_safetensors=True
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        import torch

        size = self.settings["size"]
        images = self.pipe(
            prompt=list(batch["prompt"]),
            num_inference_steps=self.settings["steps"],
            guidance_scale=self.settings["guidance"],
            width=size,
            height=size,
            generator=[torch.Generator("cpu").manual_seed(hash(i) % 2**31) for i in batch["id"]],
            output_type="np",
        ).images
        return {"id": batch["id"], "image": (images * 255).round().astype("uint8")}


def run_ray_data(settings: dict, model: Path, work: Path) -> dict:
    import ray

    # Actors that take every CPU starve Ray Data's own read and write tasks on a small machine
    # (ray-project/ray#44687): leave it logical room, as its docs advise for such pools.
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False)
    resources = {"num_gpus": 1} if settings["gpu"] else {"num_cpus": 1}
    started = time.perf_counter()
    dataset = ray.data.read_parquet(str(_write_input(settings, work))).map_batches(
        RayDataPredictor,
        fn_constructor_args=(str(model), settings),
        batch_size=settings["batch_size"],
        concurrency=settings["workers"],
        **resources,
    )
    dataset.write_images(str(work / "ray-data-out"), column="image", file_format="png")
    wall = time.perf_counter() - started
    return {"images_per_second": settings["rows"] / wall, "wall_images_per_second": settings["rows"] / wall}


VARIANTS = {"bare": run_bare, "imagemill": run_imagemill, "ray-data": run_ray_data}


# --- the harness -----------------------------------------------------------------------------------


def _child(
    variant: str, profile: str, model: Path, script: str = __file__, more: tuple[str, ...] = ()
) -> dict:
    """One variant in a fresh process: `script --child VARIANT ...` prints its result as JSON."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as work:
        done = subprocess.run(
            [
                sys.executable,
                script,
                "--child",
                variant,
                "--profile",
                profile,
                "--model",
                str(model),
                "--work",
                work,
                *more,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _pythonpath()},
        )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pythonpath() -> str:
    """bench/ first, then what the caller's path held (bench/gpu.sh: the wheels installed there)."""
    return os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (CUDA), {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU"


def _rates(results: list[dict]) -> str:
    return ", ".join(f"{result['images_per_second']:.2f}" for result in results)


def _report(profile: str, settings: dict, repeats: int, runs: dict[str, list[dict]]) -> str:
    median = {
        name: statistics.median(r["images_per_second"] for r in results) for name, results in runs.items()
    }
    wall = statistics.median(r["wall_images_per_second"] for r in runs["imagemill"])
    stages = runs["imagemill"][len(runs["imagemill"]) // 2]["stages"]
    command = f"python bench/throughput.py --profile {profile} --repeats {repeats}"
    lines = [
        f"## Throughput, {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} at the end (a loaded machine's ratios mean little).",
        f"Reproduce: `{command}`",
        "",
        f"Settings: {settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['dtype']}, "
        f"{settings['workers']} actors for (b) and (c); medians of {repeats} rounds, variants taking turns.",
        "",
        "| variant | images/s (median) | all rounds |",
        "| --- | --- | --- |",
        *(f"| {name} | {median[name]:.2f} | {_rates(runs[name])} |" for name in runs),
        f"| imagemill, whole run (start-up and load included) | {wall:.2f} | |",
        "",
        f"- b/a (imagemill generation window ÷ bare loop): **{median['imagemill'] / median['bare']:.3f}**",
        f"- b/c (imagemill whole run ÷ Ray Data whole run): **{wall / median['ray-data']:.3f}**",
        f"- imagemill stage seconds summed over shards (median round; image_encode and upload are writer"
        f" thread time, which overlaps generation): {stages}",
        "",
    ]
    return "\n".join(lines)


def _stages_report(profile: str, settings: dict, result: dict) -> str:
    """Where (b)'s time went, per stage, summed over the shards of one run."""
    stages = result["stages"]
    model = stages["text_encode"] + stages["denoise"] + stages["decode"]
    lines = [
        f"## Stage breakdown, imagemill (b), {profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
        f"Reproduce: `python bench/throughput.py --profile {profile} --stages`",
        "",
        f"{settings['rows']} prompts, batch {settings['batch_size']}, {settings['size']}² px, "
        f"{settings['steps']} steps, {settings['workers']} actors; "
        f"{result['images_per_second']:.2f} images/s over the generation window. Seconds summed over "
        "shards; text_encode + denoise + decode is the model's time, image_encode and upload are "
        "writer-thread time (it overlaps the model's), idle is the model unused while a shard held "
        "or was next in line for it.",
        "",
        "| stage | seconds | share of model + idle |",
        "| --- | --- | --- |",
        *(
            f"| {stage} | {stages[stage]:.2f} | {stages[stage] / (model + stages['idle']):.1%} |"
            for stage in ("read", "text_encode", "denoise", "decode", "image_encode", "upload", "idle")
        ),
        "",
    ]
    return "\n".join(lines)


MODELS_DIR = str(Path(tempfile.gettempdir()) / "imagemill-bench-models")  # built models, kept between runs


def variant_arguments(parser: argparse.ArgumentParser, profiles: Iterable[str], repeats: int = 3) -> None:
    """The options of a script that runs variants of one profile's model side by side."""
    parser.add_argument("--profile", choices=profiles, default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--rows", type=int, help="prompts per variant (default: the profile's)")
    parser.add_argument("--models", default=MODELS_DIR)


def no_write_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )


def publish(section: str, write: bool = True) -> None:
    """Print `section` and, unless `write` is false (--no-write), put it into BENCHMARKS.md."""
    print(section)
    if write:
        write_benchmarks(section)


def write_benchmarks(section: str) -> None:
    """Put `section` into BENCHMARKS.md, replacing the section with the same heading (its first line);
    into the file $BENCHMARKS_FILE names instead, when set (bench/gpu.sh: a copy that comes back)."""
    path = Path(os.environ.get("BENCHMARKS_FILE") or Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by the scripts in bench/.\n\n"
    heading = section.splitlines()[0]
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def run_rounds(names: Iterable[str], repeats: int, run_one: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Each variant once per round, the rounds one after another, so that the machine's load drifts
    over all variants alike; the runs by variant."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in runs:
            runs[name].append(run_one(name))
            print(
                f"round {round_ + 1}: {name} {runs[name][-1]['images_per_second']:.2f} images/s", flush=True
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=MODELS_DIR)
    parser.add_argument("--stages", action="store_true", help="run (b) once; write its stage breakdown")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = PROFILES[args.profile]
    if args.child:
        print(json.dumps(VARIANTS[args.child](settings, Path(args.model), Path(args.work))))
        return
    model = build_model(args.profile, Path(args.models))
    if args.stages:
        section = _stages_report(args.profile, settings, _child("imagemill", args.profile, model))
        publish(section)
        return
    runs = run_rounds(VARIANTS, args.repeats, lambda name: _child(name, args.profile, model))
    publish(_report(args.profile, settings, args.repeats, runs))


if __name__ == "__main__":
    main()
