"""What one shard call builds up, and the records made from it: metadata rows and the shard's stats.

A `ShardWorker` runs two `process_shard` calls at once, so each keeps its own `ShardRun`: the rows it
read, the metadata rows of the rows done so far (ok, filtered by their CLIP score, flagged by the
safety checker) with the draws they were chosen from (selection.py), the sample
thumbnails, the stage timer and timeline. From it come the shard's metadata rows (an error row for
every row not done) and its `ShardStats`, the types declared in imagemill.core.records.
"""

from __future__ import annotations

import resource
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from imagemill.core.carry import Carried
from imagemill.core.cost import DeviceUse
from imagemill.core.images import thumbnail_data_uri
from imagemill.core.labels import LABELS_SHOWN, count_labels, label_key
from imagemill.core.records import (
    ClipScoreSummary,
    MetadataRow,
    Sample,
    ShardStats,
    add_error_example,
    capped,
)
from imagemill.core.shard import Shard
from imagemill.workers.rows import Row
from imagemill.workers.selection import Drawn
from imagemill.workers.stage_timer import StageTimer
from imagemill.workers.stages.expansion import ShardExpansion

SAMPLES_PER_SHARD = 2  # thumbnails kept in the shard's stats, for the job report


def _as(kind: type, value: Any) -> Any:
    """The value if it has the column's type, else null: invalid inputs are described in `error`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, int) and not -(2**63) <= value < 2**63:
        return None
    return value if isinstance(value, kind) else None


@dataclass
class ShardRun:
    """What one `process_shard` call builds up. Two calls run at once, so none of it is on the actor."""

    shard: Shard
    model: str  # model.source, in every metadata row
    scheduler: str | None = None  # the generator's sampler, in every metadata row (diffusers only)
    started: float = field(default_factory=time.time)
    rows: list[Row] = field(default_factory=list)
    carried: Carried = field(default_factory=Carried.none)  # the rows' carried input columns
    label_column: str | None = None  # the carried column counted per label (imagemill.core.labels)
    expansion: ShardExpansion | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    timeline: dict[str, list[float]] = field(default_factory=dict)  # stage: [start, end], Unix seconds
    written: dict[int, MetadataRow] = field(default_factory=dict)  # done (ok, filtered) rows
    pending: deque[list[tuple[Row, Future[MetadataRow]]]] = field(default_factory=deque)  # being written
    truncated: set[int] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)  # their thumbnails come from `thumbnails`
    thumbnails: list[Future[str]] = field(default_factory=list)  # made on the writer threads
    redraws: int = 0  # images drawn beyond one per done row (best-of-N candidates, safety retries)
    rejected_candidates: int = 0  # unflagged draws not kept: they lost on score
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)  # `evaluation:` features by row index
    stage_columns: dict[int, dict[str, Any]] = field(default_factory=dict)  # kept draws' stage columns
    write_wait_seconds: float = 0.0  # after the model turn: the last writes and the writer's close()
    held_seconds: float = 0.0  # the device reserved for this shard: its model turn and the wait for it

    def collect(self, batch: list[tuple[Row, Future[MetadataRow]]]) -> None:
        """Wait for a batch's writes; keep its rows' metadata."""
        for row, future in batch:
            self.written[row.index] = future.result()

    def row(self, row: Row, status: str, **columns: Any) -> MetadataRow:
        """The row's metadata; `columns`: those that depend on its image or its error."""
        return MetadataRow(
            id=row.row_id,
            prompt=row.prompt if row.prompt is None else str(row.prompt),
            prompt_truncated=row.index in self.truncated,
            negative_prompt=_as(str, row.negative_prompt),
            seed=_as(int, row.seed),
            num_inference_steps=_as(int, row.num_inference_steps),
            guidance_scale=_as(float, row.guidance_scale),
            width=_as(int, row.width),
            height=_as(int, row.height),
            expanded_prompt=row.expanded_prompt,
            model=self.model,
            scheduler=self.scheduler,
            input_file=self.shard.file_url,
            input_row=row.input_row,
            status=status,
            source_image=row.source if isinstance(row.source, str) else None,
            mask_image=row.mask if isinstance(row.mask, str) else None,
            strength=_as(float, row.strength),
            **columns,
        )

    def drawn_row(self, row: Row, drawn: Drawn, **columns: Any) -> MetadataRow:
        """A done row's metadata: the seed of the draw kept, its scores, and the draws not kept."""
        kept = drawn.kept
        verdict = kept.verdict
        return replace(
            self.row(row, drawn.status, clip_score=kept.clip_score, **columns),
            seed=kept.seed,
            draw=kept.draw,
            safety_score=verdict.score if verdict else None,
            safety_concepts=(",".join(verdict.concepts) or None) if verdict else None,
            rejected_draws=drawn.rejected_json,
            ssim=kept.similarity[0] if kept.similarity else None,
            psnr=kept.similarity[1] if kept.similarity else None,
        )

    def count_draws(self, drawn: list[Drawn]) -> None:
        """Add a batch's draws not kept to the shard's counts."""
        for row_drawn in drawn:
            self.redraws += len(row_drawn.rejected)
            self.rejected_candidates += sum(not draw.flagged for draw in row_drawn.rejected)

    def label(self, row: Row) -> str | None:
        """The row's label as counted (imagemill.core.labels), or None when the job has no label column."""
        if self.label_column is None:
            return None
        return label_key(self.carried.value(self.label_column, row.index))

    def add_samples(
        self,
        shown: list[tuple[Row, np.ndarray | bytes | None]],
        submit: Callable[..., Future[str]],
    ) -> None:
        """Keep thumbnails of the first written images, up to SAMPLES_PER_SHARD, and of the first
        image of each label, up to LABELS_SHOWN labels, so that the report can show every label; a
        flagged image's thumbnail is blurred (selection.Drawn.shown). Which rows is decided here, in
        batch order; the thumbnails are made by `submit` (the writer threads), not on the model's
        thread, where the device waited for them (issue #27)."""
        kept = [(row, image) for row, image in shown if image is not None]
        labels = {sample.label for sample in self.samples}
        for row, image in kept:
            label = self.label(row)
            new_label = label is not None and label not in labels and len(labels) < LABELS_SHOWN
            if len(self.samples) >= SAMPLES_PER_SHARD and not new_label:
                continue
            labels.add(label)
            self.samples.append(
                Sample(
                    id=row.row_id,
                    prompt=capped(row.prompt),
                    expanded_prompt=capped(row.expanded_prompt),
                    seed=row.seed,
                    label=label,
                )
            )
            self.thumbnails.append(submit(thumbnail_data_uri, image))

    def metadata_rows(self) -> list[MetadataRow]:
        """Every row's metadata, in shard order: a row not done is an error row."""
        return [self.written.get(row.index) or self.row(row, "error", error=row.error) for row in self.rows]

    def stats(self, device: str, run_id: str | None, device_use: DeviceUse) -> ShardStats:
        """The shard's stats, its commit record; the time taken runs to now. `run_id`: the run that
        holds the output's lease (imagemill.core.lease); `device_use`: what its device time costs."""
        statuses = Counter(record.status for record in self.written.values())
        scores = [record.clip_score for record in self.written.values() if record.clip_score is not None]
        seconds = time.time() - self.started
        examples: dict[str, list[str]] = {}
        for row in self.rows:
            if row.error:
                add_error_example(examples, row.error)
        return ShardStats(
            shard_id=self.shard.shard_id,
            run_id=run_id,
            input_file=self.shard.file_url,
            rows=len(self.rows),
            ok=statuses["ok"],
            filtered=statuses["filtered"],
            flagged=statuses["flagged"],
            watermark_unreadable=sum(record.watermark_ok is False for record in self.written.values()),
            error=len(self.rows) - len(self.written),
            errors_by_reason=dict(Counter(row.error.split(":", 1)[0] for row in self.rows if row.error)),
            error_examples=examples,
            finished_at=datetime.now(UTC).isoformat(),
            seconds=round(seconds, 3),
            write_wait_seconds=round(self.write_wait_seconds, 3),
            stage_seconds=self.timer.summary(),
            timeline={stage: [round(t, 3) for t in span] for stage, span in self.timeline.items()},
            images_per_second=round(len(self.written) / seconds, 3) if seconds else 0.0,
            device=device,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            samples=[
                sample.model_copy(update={"thumbnail": thumbnail.result()})
                for sample, thumbnail in zip(self.samples, self.thumbnails, strict=True)
            ],
            clip_score=ClipScoreSummary.of(scores),
            expand_seconds=round(self.expansion.seconds, 3) if self.expansion else None,
            expansion_unchanged=self.expansion.unchanged if self.expansion else None,
            redraws=self.redraws,
            rejected_candidates=self.rejected_candidates,
            labels=self._label_counts(),
            **device_use.charge(self.held_seconds).model_dump(),
        )

    def _label_counts(self) -> dict[str, dict[str, int]]:
        """Rows per label and status (a row not done is an error); empty without a label column."""
        if self.label_column is None:
            return {}
        done = {index: record.status for index, record in self.written.items()}
        return count_labels((self.label(row), done.get(row.index, "error")) for row in self.rows)
