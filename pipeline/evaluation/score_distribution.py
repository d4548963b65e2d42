"""Score distributions per label, for the report's dataset section: the CLIP score (issue #17: a class
whose images match their prompts worse than the others shows as a lower mean or a long low tail) and,
for image-to-image rows, SSIM and PSNR against the source (issue #25: a class the model redraws more
than the others shows as a lower SSIM).

The shards' stats already carry the job-wide CLIP score histogram (records.ClipScoreSummary), but not
per label, and percentiles from fixed bins are only as fine as the bins. So the post-pass reads the
score columns of each committed shard's metadata Parquet and the label column, one shard at a time,
keeping only the scores: 8 bytes per score in the driver.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from imagemill.core.evaluation_results import ScoreColumn, ScoreDistribution, ScoreSummary
from imagemill.core.features import JOB_WIDE
from imagemill.core.labels import label_key
from imagemill.core.layout import OutputLayout

PERCENTILES = (10, 50, 90)


def score_distributions(
    output: OutputLayout, shard_ids: list[str], label_column: str | None, columns: list[ScoreColumn]
) -> dict[ScoreColumn, ScoreDistribution | None]:
    """Each score column's summary (count, mean, p10, p50, p90; numpy's linear percentiles) over the
    rows that have the score, job-wide and per label; None for a column no row has (scoring off, no
    image-to-image row)."""
    scores: dict[str, dict[str | None, list[np.ndarray]]] = {column: {} for column in columns}
    for shard_id in shard_ids if columns else []:  # no score column: no metadata file is opened
        with output.fs.open(output.path(OutputLayout.metadata_path(shard_id)), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            present = [column for column in columns if column in names]
            if not present:
                continue
            labelled = label_column in names
            table = parquet.read(columns=[*present, *([label_column] if labelled else [])])
        labels = (
            np.array([label_key(value) for value in table.column(label_column).to_pylist()], dtype=object)
            if labelled
            else None
        )
        for column in present:
            values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
            scored = ~np.isnan(values)  # null (score off, an error row) reads as NaN
            by_label = scores[column]
            by_label.setdefault(JOB_WIDE, []).append(values[scored])
            if labels is not None:
                for label in set(labels[scored]):
                    by_label.setdefault(label, []).append(values[scored & (labels == label)])
    return {column: _distribution(column, parts) for column, parts in scores.items()}


def _distribution(
    column: ScoreColumn, scores: dict[str | None, list[np.ndarray]]
) -> ScoreDistribution | None:
    summaries = {
        label: summary for label, parts in scores.items() if (summary := _summary(np.concatenate(parts)))
    }
    if not summaries:
        return None
    labels = sorted(label for label in summaries if label is not None)
    return ScoreDistribution(
        column=column, all=summaries.get(JOB_WIDE), per_label={label: summaries[label] for label in labels}
    )


def _summary(values: np.ndarray) -> ScoreSummary | None:
    if not len(values):
        return None
    p10, p50, p90 = (float(value) for value in np.percentile(values, PERCENTILES))
    return ScoreSummary(count=len(values), mean=float(values.mean()), p10=p10, p50=p50, p90=p90)
