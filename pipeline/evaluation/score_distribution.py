"""The CLIP score distribution per label, for the report's dataset section (issue #17): a class whose
images match their prompts worse than the others shows as a lower mean or a long low tail.

The shards' stats already carry the job-wide score histogram (records.ClipScoreSummary), but not per
label, and percentiles from fixed bins are only as fine as the bins. So the post-pass reads two columns
of each committed shard's metadata Parquet (`clip_score` and the label column), one shard at a time,
keeping only the scores: 8 bytes per scored row in the driver.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from imagemill.core.evaluation_results import ClipScoreDistribution, ScoreSummary
from imagemill.core.features import JOB_WIDE
from imagemill.core.labels import label_key
from imagemill.core.layout import OutputLayout

PERCENTILES = (10, 50, 90)


def clip_score_distribution(
    output: OutputLayout, shard_ids: list[str], label_column: str | None
) -> ClipScoreDistribution | None:
    """The summary (count, mean, p10, p50, p90; numpy's linear percentiles) of the rows with a CLIP
    score, job-wide and per label; None when no row has one (scoring off)."""
    scores: dict[str | None, list[np.ndarray]] = {}
    for shard_id in shard_ids:
        with output.fs.open(output.path(OutputLayout.metadata_path(shard_id)), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if "clip_score" not in names:
                continue
            columns = ["clip_score", *([label_column] if label_column in names else [])]
            table = parquet.read(columns=columns)
        values = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
        scored = ~np.isnan(values)  # null (scoring off, an error row) reads as NaN
        scores.setdefault(JOB_WIDE, []).append(values[scored])
        if table.num_columns == 2:
            labels = np.array([label_key(value) for value in table.column(1).to_pylist()], dtype=object)
            for label in set(labels[scored]):
                scores.setdefault(label, []).append(values[scored & (labels == label)])
    summaries = {
        label: summary for label, parts in scores.items() if (summary := _summary(np.concatenate(parts)))
    }
    if not summaries:
        return None
    labels = sorted(label for label in summaries if label is not None)
    return ClipScoreDistribution(
        all=summaries.get(JOB_WIDE), per_label={label: summaries[label] for label in labels}
    )


def _summary(values: np.ndarray) -> ScoreSummary | None:
    if not len(values):
        return None
    p10, p50, p90 = (float(value) for value in np.percentile(values, PERCENTILES))
    return ScoreSummary(count=len(values), mean=float(values.mean()), p10=p10, p50=p50, p90=p90)
