"""Issue #25's stages timed on the device, through the in-process shard worker, stage seconds reported:

    python bench/gpu_stages.py --profile gpu    # bench/gpu.sh: 1024² → 4096² and SD-1.5-shaped inpainting
    python bench/gpu_stages.py --profile cpu    # its dry run: the tiny models at 64²

- super-resolution: an enhance-only job (`model.kind: none`) whose rows' 1024² sources are enlarged x4 to
  4096² by the `upscale:` stage (spandrel, in 512² tiles with 16 px of overlap) with a random network
  of Real-ESRGAN Compact's shape (64 features, 32 convolutions: realesr-general-x4v3's), JPEG out;
- inpainting: the SD-1.5-shaped pipeline (bench/sd15_shaped.py) drawing inside each row's mask (its
  inpainting pipeline built `from_pipe`, as the worker builds it), 512², 20 steps, JPEG out.

Each runs once after a warm-up batch in the same process (the weights are random: only the time means
anything); images/s over the shard, and the shard's stage seconds from its stats.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from throughput import MODELS_DIR, PROFILES, _machine, build_model, no_write_argument, publish

# per profile: (SR input side, SR rows, SR Compact features, convolutions, tile), inpainting rows
SIZES = {"gpu": ((1024, 16, 64, 32, 512), 32), "cpu": ((64, 4, 8, 2, 32), 8)}
SR_SCALE, OVERLAP = 4, 16


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _sources(path: Path, rows: int, side: int, masks: bool) -> Path:
    """`rows` textured sources of `side`² (and, with `masks`, a centred square mask each) as a Parquet
    file of PNG bytes, with prompts."""
    from imagemill.workers.generators.emulated import textured

    columns = {
        "id": [f"r{i}" for i in range(rows)],
        "prompt": [f"a red circle number {i}" for i in range(rows)],
        "image": [_png(textured(side, side, i % 8)) for i in range(rows)],
    }
    if masks:
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        columns["mask"] = [_png(mask)] * rows
    pq.write_table(pa.table(columns), path)
    return path


def _timed_shard(spec) -> dict:
    """Images/s and stage seconds of the one shard of `spec`, the worker loaded first (not timed)."""
    from imagemill.testing.in_process import load_worker, run_shards

    worker = load_worker(spec)
    started = time.perf_counter()
    (stats,) = run_shards(worker)
    return {
        "images_per_second": stats.ok / (time.perf_counter() - started),
        "rows": stats.ok,
        "stages": {stage: round(seconds, 2) for stage, seconds in stats.stage_seconds.items() if seconds},
    }


def super_resolution(profile: str, work: Path) -> dict:
    import imagemill
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler

    (side, rows, features, convs, tile), _ = SIZES[profile]
    network = make_tiny_upscaler(work / "compact", SR_SCALE, features, convs)
    inputs = work / "sr"
    inputs.mkdir()
    _sources(inputs / "sources.parquet", rows, side, masks=False)
    device = "cuda" if PROFILES[profile]["gpu"] else "cpu"

    def spec(output: str):
        return imagemill.build_spec(
            {
                "input": {
                    "path": str(inputs),
                    "image_column": "image",
                    "prompt_column": None,
                    "rows_per_shard": rows,
                },
                "output": {"path": str(work / output), "image_format": "jpeg"},
                "model": {"kind": "none", "device": device},
                "generation": {"width": side, "height": side},
                "workers": {"batch_size": 4},
                "upscale": {
                    "source": str(network),
                    "tile": tile,
                    "tile_overlap": OVERLAP,
                    "dtype": "float16" if device == "cuda" else "float32",
                },
            }
        )

    _timed_shard(spec("sr-warm-up"))  # CUDA's first calls and cuDNN's algorithm search
    return _timed_shard(spec("sr")) | {
        "settings": f"{rows} sources {side}² → {side * SR_SCALE}², Compact x{SR_SCALE} ({features} features, "
        f"{convs} convolutions), tiles {tile}² + {OVERLAP} px overlap, batch 4"
    }


def inpainting(profile: str, work: Path, models: Path) -> dict:
    import imagemill

    settings = PROFILES[profile]
    model = build_model(profile, models)
    _, rows = SIZES[profile]
    side = settings["size"]
    inputs = work / "inpaint"
    inputs.mkdir()
    _sources(inputs / "sources.parquet", rows, side, masks=True)

    def spec(output: str):
        return imagemill.build_spec(
            {
                "input": {
                    "path": str(inputs),
                    "image_column": "image",
                    "mask_column": "mask",
                    "rows_per_shard": rows,
                },
                "output": {"path": str(work / output), "image_format": "jpeg"},
                "model": {"source": str(model), "dtype": settings["dtype"]},
                "generation": {
                    "width": side,
                    "height": side,
                    "num_inference_steps": settings["steps"],
                    "guidance_scale": settings["guidance"],
                    "strength": 1.0,
                },
                "workers": {"batch_size": settings["batch_size"]},
            }
        )

    _timed_shard(spec("inpaint-warm-up"))
    return _timed_shard(spec("inpaint")) | {
        "settings": f"{model.name} ({'SD-1.5-shaped' if settings['gpu'] else 'tiny'}), {rows} rows "
        f"{side}², {settings['steps']} steps, guidance {settings['guidance']}, strength 1, batch "
        f"{settings['batch_size']}, {settings['dtype']}, a centred square mask"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--models", default=MODELS_DIR)
    no_write_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu-stages-") as scratch:
        work = Path(scratch)
        results = {
            "super-resolution (upscale, model.kind: none)": super_resolution(args.profile, work),
            "inpainting (its pipeline from_pipe)": inpainting(args.profile, work, Path(args.models)),
        }
    command = " ".join(["python bench/gpu_stages.py", *sys.argv[1:]])
    lines = [
        f"## Super-resolution and inpainting on the device, {args.profile} profile",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}. Reproduce: `{command}`",
        "",
        "One shard each through the in-process shard worker, after a warm-up shard; random weights of the "
        "real shapes (time only). Stage seconds from the shard's stats (device stages timed by device "
        "events; image_encode and upload are writer-thread time).",
        "",
        "| job | settings | images/s | stage s |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {result['settings']} | {result['images_per_second']:.2f} | {result['stages']} |"
            for name, result in results.items()
        ),
        "",
    ]
    publish("\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
