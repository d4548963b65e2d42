"""The evaluation's reference set (`evaluation.reference`): the real images a job is compared with.

Either real images (a folder of image files, or Parquet files with an `image` column: Hugging Face's
`{bytes, path}` struct or plain bytes), embedded once on the driver with the job's feature model and
cached in the output as `_reference_features.parquet` (float32, the embeddings file layout: `id` is
the image's file relative to the reference, `label` its `evaluation.reference_label_column` value,
plus `row`, its row in a Parquet file), or precomputed statistics in clean-fid's `.npz` layout (`mu`,
`sigma`), which give FID but no KID, per-label numbers or leakage. The cache records the reference and
label column it was made from; another one is embedded again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.features import FeatureSums, embedding_matrix, embeddings_table
from imagemill.core.images import InvalidImage, decode_image
from imagemill.core.layout import REFERENCE_FEATURES
from imagemill.core.spec import EvaluationSpec
from imagemill.core.storage import filesystem
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.stamped import read_stamped, write_stamped
from imagemill.workers.actors import feature_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EMBED_BATCH = 32


@dataclass
class Reference:
    mean: np.ndarray
    cov: np.ndarray
    features: np.ndarray | None  # every reference embedding, for KID; None from precomputed statistics
    images: pa.Table | None = None  # per embedding: id (its file), row (in a Parquet file), label

    def of_label(self, label: str | None) -> Reference | None:
        """The reference a label's images are compared with: its own images where the reference is
        labelled (None with fewer than 2), else the whole reference."""
        if label is None or self.images is None or self.features is None:
            return self
        labels = self.images.column("label").to_pylist()
        if labels == [None] * len(labels):  # no label column: every label against the whole reference
            return self
        rows = [i for i, value in enumerate(labels) if value == label]
        return _from_features(self.features[rows], self.images.take(rows)) if len(rows) >= 2 else None


def _from_features(features: np.ndarray, images: pa.Table) -> Reference:
    sums = FeatureSums.empty(features.shape[1])
    sums.add(features)
    return Reference(*sums.mean_cov(), features, images)


def load_reference(spec: EvaluationSpec, output: OwnedOutput, device: str) -> Reference:
    """The reference's statistics, from its `.npz`, from the output's cache, or embedded now (and cached)."""
    assert spec.reference is not None
    fs, path = filesystem(spec.reference, spec.reference_storage_options)
    if path.endswith(".npz"):
        return _clean_fid_statistics(fs, path, spec.reference)
    basis = {"reference": spec.reference, "label_column": spec.reference_label_column}
    table = read_stamped(output.layout, REFERENCE_FEATURES, basis)
    if table is None:
        names, rows, labels, images = _images(fs, path, spec.reference, spec.reference_label_column)
        features = _embed(spec, images, device)
        table = embeddings_table(names, labels, features, np.float32)
        table = table.append_column("row", pa.array(rows, pa.int64()))
        table = write_stamped(output, REFERENCE_FEATURES, table, basis)
    if table.num_rows < 2:
        raise ImagemillError(
            f"evaluation.reference {spec.reference} holds {table.num_rows} images; FID needs 2 or more"
        )
    return _from_features(embedding_matrix(table), table.select(["id", "row", "label"]))


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


def _images(
    fs, path: str, shown: str, label_column: str | None
) -> tuple[list[str], list[int | None], list[str | None], Iterator[np.ndarray]]:
    """The reference's images in name order: each one's file (relative to the reference), row in a
    Parquet file (None for an image file) and label, filled in as the images, (H, W, 3) uint8, are read."""
    if fs.isfile(path):
        files, root = [path], path.rpartition("/")[0]
    elif fs.isdir(path):
        files, root = sorted(fs.find(path)), path.rstrip("/")
    else:
        raise ImagemillError(f"evaluation.reference {shown} does not exist")
    parquet = [name for name in files if name.endswith(".parquet")]
    images = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if not parquet and not images:
        raise ImagemillError(
            f"evaluation.reference {shown} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no "
            "Parquet files with an `image` column"
        )
    if label_column is not None and images:
        raise ImagemillError(
            f"evaluation.reference_label_column: {images[0]} is an image file, which has no labels; "
            "give the labelled reference as Parquet files only"
        )
    names: list[str] = []
    rows: list[int | None] = []
    labels: list[str | None] = []

    def read() -> Iterator[np.ndarray]:
        for name in images:
            names.append(name[len(root) :].lstrip("/"))
            rows.append(None)
            labels.append(None)
            yield _decode(fs.cat_file(name), name)
        for name in parquet:
            with fs.open(name, "rb") as f:
                reader = pq.ParquetFile(f)
                columns = ["image", *([label_column] if label_column else [])]
                missing = [column for column in columns if column not in reader.schema_arrow.names]
                if missing:
                    raise ImagemillError(f"evaluation.reference: {name} has no `{missing[0]}` column")
                row = 0
                for batch in reader.iter_batches(batch_size=EMBED_BATCH, columns=columns):
                    values = batch.column(label_column).to_pylist() if label_column else None
                    for index, value in enumerate(batch.column("image").to_pylist()):
                        names.append(name[len(root) :].lstrip("/"))
                        rows.append(row)
                        labels.append(None if values is None or values[index] is None else str(values[index]))
                        row += 1
                        yield _decode(value["bytes"] if isinstance(value, dict) else value, name)

    return names, rows, labels, read()


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        return np.asarray(decode_image(data).convert("RGB"))
    except InvalidImage as exc:
        raise ImagemillError(
            f"evaluation.reference: {name} holds an image that does not decode ({exc})"
        ) from None


def _embed(spec: EvaluationSpec, images: Iterator[np.ndarray], device: str) -> np.ndarray:
    """The images' embeddings with the job's feature model, batched by consecutive images of one size."""
    model = feature_model(spec, device)
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
