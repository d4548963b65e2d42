"""The encode ceiling: how many images/s a CPU core encodes, per format and size, and what a GPU needs.

    python bench/encode_ceiling.py                # writes BENCHMARKS.md; on CUDA, nvJPEG too
    python bench/encode_ceiling.py --images 4     # a quick look

Images are textured (smooth colour fields, edges and fine noise, like generated images; flat colours
would compress to nothing), 512² and 1024². Each encoder setting is timed on one thread; then the
default PNG at 512² on 1, 2 and all cores, once with threads and once with processes, which shows
whether Pillow's encoders release the GIL. From the per-core rate: the cores a GPU making 10, 30 and
60 images/s needs to keep up. On CUDA, torchvision's nvJPEG encodes batches on the GPU (the bytes
cross PCIe compressed; workers/device_jpeg.py).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
from PIL import Image
from throughput import _machine, publish

from imagemill.workers.generators.emulated import textured

SIZES = (512, 1024)
# name → Pillow format and options; imagemill writes the defaults (PNG level 6, WebP method 4).
ENCODERS = {
    "png, level 1": ("PNG", {"compress_level": 1}),
    "png, level 6 (imagemill)": ("PNG", {"compress_level": 6}),
    "jpeg q90 (imagemill)": ("JPEG", {"quality": 90}),
    "webp q90, method 0": ("WEBP", {"quality": 90, "method": 0}),
    "webp q90, method 4 (imagemill)": ("WEBP", {"quality": 90, "method": 4}),
}
GPU_RATES = (10, 30, 60)


def encode(pixels: np.ndarray, name: str) -> int:
    image_format, options = ENCODERS[name]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.tell()


def per_core(images: list[np.ndarray], name: str) -> tuple[float, float]:
    """Images/s on one thread, and mean kB per image."""
    started = time.perf_counter()
    sizes = [encode(image, name) for image in images]
    return len(images) / (time.perf_counter() - started), sum(sizes) / len(sizes) / 1000


def scaled(pool: Executor, images: list[np.ndarray], name: str) -> float:
    list(pool.map(encode, images[:2], [name] * 2))  # start the workers
    started = time.perf_counter()
    list(pool.map(encode, images, [name] * len(images)))
    return len(images) / (time.perf_counter() - started)


def nvjpeg(images: list[np.ndarray], batch: int = 16) -> float | None:
    """Images/s for torchvision's nvJPEG on the GPU (q90), from device tensors to bytes on the host."""
    try:
        import torch
        from torchvision.io import encode_jpeg

        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    tensors = [torch.from_numpy(image).permute(2, 0, 1).contiguous().cuda() for image in images]
    encode_jpeg(tensors[:batch], quality=90)  # warm up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(tensors), batch):
        [data.cpu() for data in encode_jpeg(tensors[i : i + batch], quality=90)]
    return len(tensors) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per measurement and size")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows, rates = [], {}
    for size in SIZES:
        images = [textured(size, size, seed) for seed in range(args.images)]
        for name in ENCODERS:
            rate, kb = per_core(images, name)
            rates[name, size] = rate
            needs = " / ".join(f"{math.ceil(target / rate)}" for target in GPU_RATES)
            rows.append(f"| {name} | {size}² | {rate:.1f} | {1000 / rate:.0f} | {kb:.0f} | {needs} |")
        gpu = nvjpeg(images * 4)
        if gpu is not None:
            rows.append(
                f"| jpeg q90, nvJPEG on the GPU (batches of 16) | {size}² | {gpu:.0f} (GPU) | "
                f"{1000 / gpu:.2f} | | 0 |"
            )
    name, size = "png, level 6 (imagemill)", 512
    images = [textured(size, size, seed) for seed in range(args.images * 2)]
    scaling = []
    for workers in sorted({1, 2, cores}):
        with ThreadPoolExecutor(workers) as threads:
            by_threads = scaled(threads, images * workers, name)
        with ProcessPoolExecutor(workers) as processes:
            by_processes = scaled(processes, images * workers, name)
        scaling.append(f"| {workers} | {by_threads:.1f} | {by_processes:.1f} |")
    section = "\n".join(
        [
            "## Encode ceiling: images/s per CPU core, and the cores a GPU needs",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}.",
            f"Reproduce: `python bench/encode_ceiling.py --images {args.images}`",
            "",
            f"Textured images (bench/encode_ceiling.py), {args.images} per measurement; one thread each.",
            "",
            "| encoder | size | images/s per core | ms per image | kB per image | cores for "
            + " / ".join(f"{t}" for t in GPU_RATES)
            + " images/s |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Scaling, {name} at {size}²: images/s on N cores, threads vs processes",
            "",
            "| N | threads | processes |",
            "| --- | --- | --- |",
            *scaling,
            "",
        ]
    )
    publish(section)


if __name__ == "__main__":
    main()
