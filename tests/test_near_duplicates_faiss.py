"""Near-duplicates by FAISS (a CPU driver with a large job): the same duplicates.parquet as the exact
blockwise torch pass on the same embedding files. No generation: the files are written as actors write
them, with planted copies (exact ones, so nearest matches tie, and noisy ones around the threshold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagemill.core.features import embeddings_table
from imagemill.core.layout import OutputLayout, parquet_bytes
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation import near_duplicates
from imagemill.evaluation.near_duplicates import find_duplicates
from imagemill.evaluation.similarity_search import FAISS_MIN_IMAGES, search_method

THRESHOLD = 0.98
DIM = 64
SHARD_SIZES = (90, 0, 75, 130, 60, 90, 80)  # one empty shard (every row an error)


def _write_job(output: OutputLayout) -> tuple[list[str], set[frozenset[str]]]:
    """Embedding files; returns the shard ids and the pairs planted at or above the threshold."""
    rng = np.random.default_rng(7)
    total = sum(SHARD_SIZES)
    vectors = rng.standard_normal((total, DIM)).astype(np.float32)
    ids = [f"img-{i:04d}" for i in range(total)]
    # exact copies across shards, three of one image: their nearest matches tie at cosine 1
    for copy, original in ((100, 3), (300, 3), (200, 10), (460, 20)):
        vectors[copy] = vectors[original]
    # noisy copies whose cosine lands on both sides of the threshold
    for copy, original, noise in ((50, 400, 0.15), (60, 410, 0.2), (70, 420, 0.25), (80, 430, 0.3)):
        vectors[copy] = vectors[original] + noise * rng.standard_normal(DIM).astype(
            np.float32
        ) * np.linalg.norm(vectors[original]) / np.sqrt(DIM)
    output.fs.makedirs(output.path("embeddings"), exist_ok=True)
    shard_ids, start = [], 0
    for number, size in enumerate(SHARD_SIZES):
        shard_id = f"shard-{number:03d}"
        rows = slice(start, start + size)
        table = embeddings_table(ids[rows], [None] * size, vectors[rows].reshape(size, DIM))
        OwnedOutput.unleased(output).write_whole(OutputLayout.embeddings_path(shard_id), parquet_bytes(table))
        shard_ids.append(shard_id)
        start += size
    stored = vectors.astype(np.float16).astype(np.float64)  # as the files hold them
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    cosines = np.triu(unit @ unit.T, k=1)
    planted = {frozenset((ids[i], ids[j])) for i, j in zip(*np.nonzero(cosines >= THRESHOLD), strict=True)}
    return shard_ids, planted


def test_faiss_finds_what_the_blockwise_pass_finds(tmp_path, monkeypatch):
    output = OutputLayout(str(tmp_path))
    shard_ids, planted = _write_job(output)
    monkeypatch.setattr(near_duplicates, "BLOCK_ROWS", 128)  # several blocks, so across blocks too
    blockwise = find_duplicates(output, shard_ids, THRESHOLD, "torch")
    indexed = find_duplicates(output, list(reversed(shard_ids)), THRESHOLD, "faiss")

    assert indexed.equals(blockwise)
    rows = indexed.to_pylist()
    found = {frozenset((row["id"], row["nearest"])) for row in rows}
    assert found <= planted and len(planted) >= 5  # the planted pairs above the threshold ...
    groups: dict[int, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(row["id"])
    members = {id_ for pair in planted for id_ in pair}
    assert set().union(*groups.values()) == members  # ... and only their images are marked
    assert {"img-0003", "img-0100", "img-0300"} in groups.values()
    # the noisy copies straddle the threshold: some are in, some are out
    assert (
        0
        < sum(
            frozenset((f"img-{c:04d}", f"img-{o:04d}")) in planted
            for c, o in ((50, 400), (60, 410), (70, 420), (80, 430))
        )
        < 4
    )
    # a tie: img-0003 is as similar to img-0100 as to img-0300, and the first in shard order is named
    by_id = {row["id"]: row for row in rows}
    assert by_id["img-0003"]["nearest"] == "img-0100" and by_id["img-0003"]["cosine"] == 1.0


def test_the_way_is_chosen_by_size():
    large = "torch" if torch.cuda.is_available() else "faiss"
    assert search_method(FAISS_MIN_IMAGES - 1) == "torch"
    assert search_method(FAISS_MIN_IMAGES) == large


@pytest.mark.parametrize("method", ["torch", "faiss"])
def test_an_output_without_embeddings_has_no_duplicates(tmp_path, method):
    table = find_duplicates(OutputLayout(str(tmp_path)), ["shard-000"], THRESHOLD, method)
    assert table.num_rows == 0
