"""The evaluation's reference set (`evaluation.reference`): the real images a job is compared with.

Either real images (a folder of image files, or Parquet files with an `image` column: Hugging Face's
`{bytes, path}` struct or plain bytes), embedded once on the driver with the job's feature model and
cached in the output as `_reference_features.parquet` (float32, the embeddings file layout), or
precomputed statistics in clean-fid's `.npz` layout (`mu`, `sigma`), which give FID but no KID.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from imagemill.errors import ImagemillError
from imagemill.features import FeatureSums, embedding_matrix, embeddings_table
from imagemill.output import REFERENCE_FEATURES, OutputLayout
from imagemill.spec import EvaluationSpec
from imagemill.storage import filesystem
from imagemill.workers.writers import parquet_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EMBED_BATCH = 32


@dataclass
class Reference:
    mean: np.ndarray
    cov: np.ndarray
    features: np.ndarray | None  # every reference embedding, for KID; None from precomputed statistics


def load_reference(spec: EvaluationSpec, output: OutputLayout, device: str) -> Reference:
    """The reference's statistics, from its `.npz`, from the output's cache, or embedded now (and cached)."""
    assert spec.reference is not None
    fs, path = filesystem(spec.reference, spec.reference_storage_options)
    if path.endswith(".npz"):
        return _clean_fid_statistics(fs, path, spec.reference)
    try:
        with output.fs.open(output.path(REFERENCE_FEATURES), "rb") as f:
            features = embedding_matrix(pq.read_table(f))
    except FileNotFoundError:
        features = _embed(spec, _images(fs, path, spec.reference), device)
        table = embeddings_table(
            [str(i) for i in range(len(features))], [None] * len(features), features, np.float32
        )
        output.write_bytes(REFERENCE_FEATURES, parquet_bytes(table))
    if len(features) < 2:
        raise ImagemillError(
            f"evaluation.reference {spec.reference} holds {len(features)} images; FID needs 2 or more"
        )
    sums = FeatureSums.empty(features.shape[1])
    sums.add(features)
    return Reference(*sums.mean_cov(), features)


def _clean_fid_statistics(fs, path: str, shown: str) -> Reference:
    try:
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            return Reference(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), None)
    except FileNotFoundError:
        raise ImagemillError(f"evaluation.reference {shown} does not exist") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ImagemillError(
            f"evaluation.reference {shown} is not clean-fid statistics (an .npz with mu and sigma): {exc}"
        ) from None


def _images(fs, path: str, shown: str) -> Iterator[np.ndarray]:
    """The reference's images as (H, W, 3) uint8, in name order."""
    if fs.isfile(path):
        files = [path]
    elif fs.isdir(path):
        files = sorted(fs.find(path))
    else:
        raise ImagemillError(f"evaluation.reference {shown} does not exist")
    parquet = [name for name in files if name.endswith(".parquet")]
    images = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if not parquet and not images:
        raise ImagemillError(
            f"evaluation.reference {shown} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no "
            "Parquet files with an `image` column"
        )
    for name in images:
        yield _decode(fs.cat_file(name), name)
    for name in parquet:
        with fs.open(name, "rb") as f:
            reader = pq.ParquetFile(f)
            if "image" not in reader.schema_arrow.names:
                raise ImagemillError(f"evaluation.reference: {name} has no `image` column")
            for batch in reader.iter_batches(batch_size=EMBED_BATCH, columns=["image"]):
                for value in batch.column("image").to_pylist():
                    yield _decode(value["bytes"] if isinstance(value, dict) else value, name)


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise ImagemillError(
            f"evaluation.reference: {name} holds an image that does not decode ({exc})"
        ) from None


def _embed(spec: EvaluationSpec, images: Iterator[np.ndarray], device: str) -> np.ndarray:
    """The images' embeddings with the job's feature model, batched by consecutive images of one size."""
    from imagemill.workers.stages.evaluation import FeatureModel  # the driver loads it only here

    model = FeatureModel(spec, device)
    embedded, batch = [], []

    def flush() -> None:
        if batch:
            embedded.append(model.embed(torch.from_numpy(np.stack(batch)).to(device)))
            batch.clear()

    for image in images:
        if batch and (image.shape != batch[0].shape or len(batch) == EMBED_BATCH):
            flush()
        batch.append(image)
    flush()
    return np.concatenate(embedded) if embedded else np.empty((0, model.dim), np.float32)
