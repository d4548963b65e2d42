"""JPEG encoded on the GPU (workers/device_jpeg.py): runs where CUDA and torchvision are (bench/gpu.sh
runs it on a lent GPU); skipped elsewhere, as CI has neither."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import imagemill
from imagemill.core.images import encode_image
from imagemill.workers.device_jpeg import DeviceJpeg


def _torchvision() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # absent, or built for another torch (these CPU machines)
        return False
    return True


needs_nvjpeg = pytest.mark.skipif(
    not (torch.cuda.is_available() and _torchvision()), reason="needs CUDA and torchvision (nvJPEG)"
)


@needs_nvjpeg
def test_a_cuda_jpeg_job_is_encoded_on_the_gpu_and_decodes_to_the_images(tmp_path, tiny_model):
    from imagemill.testing.in_process import load_worker, run_shards

    prompts = tmp_path / "in"
    prompts.mkdir()
    table = pa.table({"id": [f"r{i}" for i in range(6)], "prompt": [f"a cat {i}" for i in range(6)]})
    pq.write_table(table, prompts / "p.parquet")
    spec = imagemill.build_spec(
        {
            "input": {"path": str(prompts), "rows_per_shard": 8},
            "output": {"path": str(tmp_path / "out"), "image_format": "jpeg", "quality": 90},
            "model": {"source": tiny_model, "device": "cuda"},
            "generation": {"width": 64, "height": 64, "num_inference_steps": 2},
            "workers": {"batch_size": 4},
        }
    )
    worker = load_worker(spec)
    assert worker.stages.get("copy_back").device_jpeg is not None
    [stats] = run_shards(worker)
    assert stats.ok == 6
    metadata = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    generated = worker.generator.generate(
        [f"a cat {i}" for i in range(4)], [None] * 4, [row["seed"] for row in metadata[:4]], _key(spec)
    )
    for row, pixels in zip(metadata[:4], generated.cpu().numpy(), strict=True):
        data = (tmp_path / "out" / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert data[:2] == b"\xff\xd8", "a JPEG file"
        pillow = encode_image(pixels, "jpeg", 90)
        assert data != pillow, "nvJPEG's bytes, not Pillow's"
        # As close to this row's image as Pillow's JPEG of it (another row's differs by tens of levels).
        assert _error(data, pixels) < 1.5 * _error(pillow, pixels) + 1, "the file holds this row's image"


def _error(data: bytes, pixels: np.ndarray) -> float:
    """Mean absolute difference, in levels of 255, between a JPEG's pixels and `pixels`."""
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return float(np.abs(decoded - pixels).mean())


def _key(spec):
    from imagemill.workers.rows import BatchKey

    g = spec.generation
    return BatchKey(g.width, g.height, g.num_inference_steps, g.guidance_scale)


def _spec(image_format: str = "jpeg", **output):
    return imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out", "image_format": image_format, **output},
            "model": {"source": "/m"},
            "generation": {"width": 256, "height": 256},
        }
    )


def test_png_cpu_or_watermarked_jobs_keep_the_writer_threads_encoding():
    assert DeviceJpeg.for_job(_spec("png"), "cuda") is None
    assert DeviceJpeg.for_job(_spec(), "cpu") is None
    # a watermark is added to the pixels on the CPU before encoding
    assert DeviceJpeg.for_job(_spec(watermark={"payload": "night"}), "cuda") is None


@needs_nvjpeg
def test_jpeg_on_any_cuda_device_is_encoded_there():
    assert DeviceJpeg.for_job(_spec(), "cuda:0") is not None


def test_the_report_thumbnail_of_an_image_encoded_on_the_gpu_shows_it():
    """The worker hands GPU-encoded rows to the report's samples as bytes; the thumbnail decodes them."""
    import base64

    from imagemill.core.images import thumbnail_data_uri

    pixels = np.zeros((128, 128, 3), np.uint8)
    pixels[:, 64:] = (200, 30, 30)  # black left half, red right half
    uri = thumbnail_data_uri(encode_image(pixels, "jpeg", 90))
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumbnail.size == (96, 96)
    left, right = np.asarray(thumbnail)[48, 10], np.asarray(thumbnail)[48, 85]
    assert left.max() < 30 and right[0] > 170 > 60 > right[1]
