"""Leakage (`evaluation.leakage`): generated images that are near-copies of a reference image, i.e.
whose cosine similarity to some reference image is at least `evaluation.duplicate_threshold`.

Streamed as the near-duplicates are (imagemill.evaluation.similarity_search, chosen by size): the driver holds
the reference's unit vectors (already in memory for KID; in a faiss index on a large CPU job) and one
shard's embedding file at a time. `leakage.parquet` has one row per marked image: id, shard_id,
position, reference (the reference image's file, relative to the reference), reference_row (its row
in that Parquet file; null for an image file) and cosine, to its most similar reference image (the
first in reference order among equals). Stamped with its basis, so a re-run with nothing new reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import torch

from imagemill.core.evaluation_results import LeakagePair, LeakageResult
from imagemill.core.layout import LEAKAGE, OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.distribution_metrics import unit_rows
from imagemill.evaluation.embedding_passes import read_shard_embeddings
from imagemill.evaluation.metric import StateKind, StreamedShards, StreamsShards
from imagemill.evaluation.reference import Reference
from imagemill.evaluation.similarity_search import FaissIndex, Method, close_pairs, search_method
from imagemill.evaluation.stamped import read_stamped, write_stamped

EXAMPLE_PAIRS = 5  # pairs shown in the report


def find_leakage(
    output: OutputLayout, shard_ids: list[str], reference: Reference, threshold: float, method: Method
) -> pa.Table:
    """The marked images of these shards (see the module docstring)."""
    assert reference.features is not None and reference.images is not None
    real = unit_rows(reference.features)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = None
    if method == "faiss":
        index = FaissIndex(real.shape[1])
        index.add(real)
    marked: list[dict[str, Any]] = []
    names = reference.images.column("id").to_pylist()
    rows = reference.images.column("row").to_pylist()
    for shard_id, ids, _, vectors in read_shard_embeddings(output, sorted(shard_ids)):
        unit = unit_rows(vectors)
        pairs = index.within(unit, threshold) if index else close_pairs(unit, real, threshold, device)
        best: dict[int, tuple[float, int]] = {}
        for i, j, cosine in pairs:
            if i not in best or (-cosine, j) < (-best[i][0], best[i][1]):
                best[i] = (cosine, j)
        for i, (cosine, j) in sorted(best.items()):
            marked.append(
                {
                    "id": ids[i],
                    "shard_id": shard_id,
                    "position": i,
                    "reference": names[j],
                    "reference_row": rows[j],
                    "cosine": round(cosine, 6),
                }
            )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("shard_id", pa.string()),
            ("position", pa.int64()),
            ("reference", pa.string()),
            ("reference_row", pa.int64()),
            ("cosine", pa.float64()),
        ]
    )
    return pa.Table.from_pylist(marked, schema=schema)


@dataclass(frozen=True)
class Leakage(StreamsShards):
    """The job's leakage as a metric (imagemill.evaluation.metric): its state is the set of shards
    (StreamedShards); `compute` reads `leakage.parquet` when it was made
    from the same basis (those shards, the reference setting and the threshold), else finds them
    against the reference's features and writes it."""

    state: ClassVar[StateKind] = "shards"
    output: OwnedOutput  # written through the gate (core/write_gate.py)
    reference: Reference
    source: str  # `evaluation.reference`, as the stamp names the reference
    threshold: float
    streamed: StreamedShards = StreamedShards()

    def compute(self) -> LeakageResult:
        basis = {"shards": self.streamed.shards, "threshold": self.threshold, "reference": self.source}
        table = read_stamped(self.output.layout, LEAKAGE, basis)
        if table is None:
            method = search_method(self.streamed.images)
            table = find_leakage(
                self.output.layout, list(self.streamed.shards), self.reference, self.threshold, method
            )
            write_stamped(self.output, LEAKAGE, table, basis)
        return LeakageResult(
            threshold=self.threshold,
            file=LEAKAGE,
            images=table.num_rows,
            examples=[
                LeakagePair(
                    id=row["id"],
                    reference=row["reference"],
                    reference_row=row["reference_row"],
                    cosine=row["cosine"],
                )
                for row in table.slice(0, EXAMPLE_PAIRS).to_pylist()
            ],
        )
