"""The Ray actor: loads the model once, then turns shard after shard into images, metadata and stats.

Everything a shard produces is written from here straight to the output location; the driver gets
back only the shard's stats. Images go through the shard's `ShardWriter` (one per output format, see
writers.py), then the metadata Parquet is written, then the stats file: its presence is the commit.
Two shard calls run at once, taking the model in turn (model_turns.py), so the next shard is read
while the current one generates; the stats split each shard's time by stage (stage_timer.py).
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from imagemill.output import OutputLayout
from imagemill.shards import Shard
from imagemill.spec import JobSpec
from imagemill.workers.diffusers_generator import DiffusersGenerator
from imagemill.workers.encoding import encode_image, thumbnail_data_uri
from imagemill.workers.model_source import resolve_model_source
from imagemill.workers.model_turns import ModelTurns
from imagemill.workers.noop_generator import NoopGenerator
from imagemill.workers.rows import Row, make_batches, prepare_rows, read_shard
from imagemill.workers.speed import SpeedOptions
from imagemill.workers.stage_timer import StageTimer
from imagemill.workers.writers import METADATA_SCHEMA, ShardWriter, open_writer, parquet_bytes

WRITER_THREADS = 4
BATCHES_IN_FLIGHT = 2  # batches encoded/uploaded in the background while the next one generates
SAMPLES_PER_SHARD = 2  # thumbnails kept in the shard's stats, for the job report


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _as(kind: type, value: Any) -> Any:
    """The value if it has the column's type, else null: invalid inputs are described in `error`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, int) and not -(2**63) <= value < 2**63:
        return None
    return value if isinstance(value, kind) else None


def make_generator(spec: JobSpec, device: str) -> DiffusersGenerator | NoopGenerator:
    if spec.model.kind == "noop":
        return NoopGenerator()
    source = resolve_model_source(spec.model)
    speed = SpeedOptions.from_spec(spec)
    return DiffusersGenerator(source, spec.model.dtype, device, spec.model.safetensors_only, speed)


@dataclass
class ShardRun:
    """What one `process_shard` call builds up. Two calls run at once, so none of it is on the actor."""

    shard: Shard
    timer: StageTimer = field(default_factory=StageTimer)
    timeline: dict[str, list[float]] = field(default_factory=dict)  # stage: [start, end], Unix seconds
    written: dict[int, dict[str, Any]] = field(default_factory=dict)  # ok rows' metadata, by position
    pending: deque[list[tuple[Row, Future]]] = field(default_factory=deque)  # batches being written
    truncated: set[int] = field(default_factory=set)
    samples: list[dict[str, Any]] = field(default_factory=list)
    generate_seconds: float = 0.0

    def collect(self, batch: list[tuple[Row, Future]]) -> None:
        """Wait for a batch's writes; keep its rows' metadata records."""
        for row, future in batch:
            self.written[row.index] = future.result()


class ShardWorker:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.device = pick_device(spec.model.device)
        self.generator = make_generator(spec, self.device)
        self.output = OutputLayout(spec.output.path, spec.output.storage_options)
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="imagemill-writer")
        self.turns = ModelTurns()

    def ready(self) -> dict[str, Any]:
        return {"device": self.device, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    def _write_image(
        self, writer: ShardWriter, run: ShardRun, row: Row, truncated: bool, pixels: np.ndarray
    ) -> dict[str, Any]:
        """Encode one ok row's image and hand it to the writer; returns the row's metadata record."""
        with run.timer.timing("image_encode"):
            data = encode_image(pixels, self.spec.output.image_format, self.spec.output.quality)
        record = {**self._record(run.shard, row, truncated), "sha256": hashlib.sha256(data).hexdigest()}
        with run.timer.timing("upload"):
            location = writer.add(row.index, record, data)
        return {**record, "status": "ok", **location}

    def _record(self, shard: Shard, row: Row, truncated: bool) -> dict[str, Any]:
        """The row's metadata columns, less those that depend on its image (status, path, sha256)."""
        return {
            "id": row.row_id,
            "prompt": row.prompt if row.prompt is None else str(row.prompt),
            "prompt_truncated": truncated,
            "negative_prompt": _as(str, row.negative_prompt),
            "seed": _as(int, row.seed),
            "num_inference_steps": _as(int, row.num_inference_steps),
            "guidance_scale": _as(float, row.guidance_scale),
            "width": _as(int, row.width),
            "height": _as(int, row.height),
            "model": self.spec.model.source,
            "input_file": shard.file_url,
            "input_row": row.input_row,
        }

    def process_shard(self, shard: Shard) -> dict[str, Any]:
        """Read, generate, write and commit one shard; returns its stats.

        Two calls run at once on the actor (`max_concurrency` in the scheduler): while one holds the
        model for its generate loop, the other reads and validates its shard, or drains its writes
        and writes its metadata and commit. Everything per shard lives in this call's `ShardRun`; the
        actor's shared parts are the model (held in turn), the writer thread pool and the output.
        """
        started = time.time()
        run = ShardRun(shard)
        with self.turns.ticket() as turn:
            with run.timer.timing("read"):
                table = read_shard(shard, self.spec.input)
                rows = prepare_rows(table, shard, self.spec.input, self.spec.generation)
            run.timeline["read"] = [started, time.time()]
            self.output.prepare_shard(shard.shard_id, self.spec.output.format)
            writer = open_writer(self.spec.output, self.output, shard.shard_id)
            with turn:
                run.timer.add("idle", turn.idle_seconds)
                model_started = time.time()
                self._generate(run, rows, writer)
                run.timeline["model"] = [model_started, time.time()]

        tick = time.time()
        while run.pending:
            run.collect(run.pending.popleft())
        with run.timer.timing("upload"):
            writer.close()  # tar/parquet formats upload the shard's images here, before its metadata
        drain_seconds = time.time() - tick

        self._write_metadata(shard, rows, run.written, run.truncated, writer)
        errors = Counter(row.error.split(":", 1)[0] for row in rows if row.error)
        seconds = time.time() - started
        stats = {
            "shard_id": shard.shard_id,
            "input_file": shard.file_url,
            "rows": len(rows),
            "ok": len(run.written),
            "error": len(rows) - len(run.written),
            "errors_by_reason": dict(errors),
            "finished_at": datetime.now(UTC).isoformat(),
            "seconds": round(seconds, 3),
            "read_seconds": round(run.timeline["read"][1] - started, 3),
            "generate_seconds": round(run.generate_seconds, 3),
            "write_wait_seconds": round(drain_seconds, 3),
            "stage_seconds": run.timer.summary(),
            "timeline": {stage: [round(t, 3) for t in span] for stage, span in run.timeline.items()},
            "images_per_second": round(len(run.written) / seconds, 3) if seconds else 0.0,
            "device": self.device,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "samples": run.samples,
        }
        self.output.write_json(OutputLayout.stats_path(shard.shard_id), stats)
        return stats

    def _generate(self, run: ShardRun, rows: list[Row], writer: ShardWriter) -> None:
        """The generate loop, run while holding the model: each batch's images go to the writer
        threads while the next batch generates, at most BATCHES_IN_FLIGHT batches behind."""
        model_stages = getattr(self.generator, "stage_timer", None)  # None: no split (noop)
        for batch in make_batches(rows, self.spec.workers.batch_size):
            tick = time.time()
            prompts = [row.prompt for row in batch]
            run.truncated.update(
                row.index for row, cut in zip(batch, self.generator.truncated(prompts), strict=True) if cut
            )
            try:
                images = self.generator.generate(
                    prompts, [row.negative_prompt for row in batch], [row.seed for row in batch], batch[0].key
                )
                pixels = images.cpu().numpy()
            except ValueError as exc:  # the pipeline's own checks refused these parameters
                for row in batch:
                    row.error = f"model_rejected: {exc}"
                continue
            finally:
                seconds = time.time() - tick
                run.generate_seconds += seconds
                inner = model_stages.take() if model_stages else {}
                for stage, spent in inner.items():
                    run.timer.add(stage, spent)
                run.timer.add("denoise", seconds - sum(inner.values()))
            for row, image in zip(batch[: SAMPLES_PER_SHARD - len(run.samples)], pixels, strict=False):
                run.samples.append(
                    {
                        "id": row.row_id,
                        "prompt": row.prompt,
                        "seed": row.seed,
                        "thumbnail": thumbnail_data_uri(image),
                    }
                )
            run.pending.append(
                [
                    (
                        row,
                        self.writers.submit(
                            self._write_image, writer, run, row, row.index in run.truncated, image
                        ),
                    )
                    for row, image in zip(batch, pixels, strict=True)
                ]
            )
            if len(run.pending) > BATCHES_IN_FLIGHT:
                with run.timer.timing("idle"):  # write backpressure: the model waits for the writers
                    run.collect(run.pending.popleft())

    def _write_metadata(
        self,
        shard: Shard,
        rows: list[Row],
        written: dict[int, dict[str, Any]],
        truncated: set[int],
        writer: ShardWriter,
    ) -> None:
        records = [
            written.get(row.index)
            or {**self._record(shard, row, row.index in truncated), "status": "error", "error": row.error}
            for row in rows
        ]
        schema = pa.schema([*METADATA_SCHEMA, *writer.metadata_fields])
        table = pa.Table.from_pylist(records, schema=schema)
        self.output.write_bytes(OutputLayout.metadata_path(shard.shard_id), parquet_bytes(table))
