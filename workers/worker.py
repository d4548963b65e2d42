"""The Ray actor: loads the model once, then turns shard after shard into images, metadata and stats.

Everything a shard produces is written from here straight to the output location; the driver gets
back only the shard's stats. Images go through the shard's `ShardWriter` (one per output format, see
writers.py), then the metadata Parquet is written, then the stats file: its presence is the commit.
Two shard calls run at once, taking the model in turn (model_turns.py), so the next shard is read
while the current one generates; the stats split each shard's time by stage (stage_timer.py).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
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

from imagemill.lease import check_owner
from imagemill.output import OutputLayout
from imagemill.scores import summarise
from imagemill.shards import Shard
from imagemill.spec import JobSpec
from imagemill.workers.encoding import encode_image, thumbnail_data_uri
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.generators.diffusion.speed import SpeedOptions
from imagemill.workers.generators.janus import JanusGenerator
from imagemill.workers.generators.noop import NoopGenerator
from imagemill.workers.model_source import resolve_model_source, resolve_source
from imagemill.workers.model_turns import ModelTurns
from imagemill.workers.rows import Row, make_batches, prepare_rows, read_shard
from imagemill.workers.stage_timer import StageTimer
from imagemill.workers.stages.expansion import PromptExpander, ShardExpansion
from imagemill.workers.stages.scoring import ClipScorer
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


def make_generator(spec: JobSpec, device: str) -> DiffusersGenerator | JanusGenerator | NoopGenerator:
    if spec.model.kind == "noop":
        return NoopGenerator()
    model = spec.model
    source = resolve_model_source(model)
    if model.kind == "janus":
        return JanusGenerator(source, model.dtype, device, model.safetensors_only)
    loras = [(lora, resolve_source(lora.source, model.storage_options)) for lora in model.lora]
    return DiffusersGenerator(
        source,
        model.dtype,
        device,
        model.safetensors_only,
        speed=SpeedOptions.from_spec(spec),
        loras=loras,
        quantization=model.quantization,
    )


@dataclass
class ShardRun:
    """What one `process_shard` call builds up. Two calls run at once, so none of it is on the actor."""

    shard: Shard
    timer: StageTimer = field(default_factory=StageTimer)
    timeline: dict[str, list[float]] = field(default_factory=dict)  # stage: [start, end], Unix seconds
    written: dict[int, dict[str, Any]] = field(default_factory=dict)  # done (ok, filtered) rows' metadata
    pending: deque[list[tuple[Row, Future]]] = field(default_factory=deque)  # batches being written
    truncated: set[int] = field(default_factory=set)
    samples: list[dict[str, Any]] = field(default_factory=list)
    generate_seconds: float = 0.0

    def collect(self, batch: list[tuple[Row, Future]]) -> None:
        """Wait for a batch's writes; keep its rows' metadata records."""
        for row, future in batch:
            self.written[row.index] = future.result()


class ShardWorker:
    def __init__(self, spec: JobSpec, expanders: list[Any] | None = None, run_id: str | None = None):
        """`expanders`: handles of the expander actors with `expansion.placement: pool`; `run_id`: the
        run holding the output's lease (None outside a run: commits unchecked).

        A model that does not load is kept for `ready()` to raise: an actor whose creation fails dies
        printing its traceback and a SIGABRT notice into the driver's output, burying the one-line error.
        """
        self.spec = spec
        self.run_id = run_id
        self.load_error: Exception | None = None
        try:
            self._load(spec, expanders)
        except Exception as exc:
            self.load_error = exc

    def _load(self, spec: JobSpec, expanders: list[Any] | None) -> None:
        self.device = pick_device(spec.model.device)
        self.generator = make_generator(spec, self.device)
        self.scorer = ClipScorer(spec.scoring, self.device) if spec.scoring else None
        self.expanders = expanders or []
        self.expander = (
            PromptExpander(spec.expansion, self.device)
            if spec.expansion is not None and spec.expansion.placement == "actor"
            else None
        )
        self.output = OutputLayout(spec.output.path, spec.output.storage_options)
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="imagemill-writer")
        self.turns = ModelTurns()

    def ready(self) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        return {"device": self.device, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    def _score(self, images: torch.Tensor, prompts: list[str]) -> list[float | None]:
        """Each image's CLIP score with the text it was generated from, computed on the
        images where the generator left them (its device); None for every row when scoring is off."""
        if self.scorer is None:
            return [None] * len(prompts)
        return self.scorer.score(images, prompts)

    def _status(self, score: float | None) -> str:
        """`filtered` for a score under scoring.threshold, else `ok`."""
        threshold = self.spec.scoring.threshold if self.spec.scoring else None
        return "filtered" if score is not None and threshold is not None and score < threshold else "ok"

    def _dropped(self, status: str) -> bool:
        """Whether a row of this status gets no image (scoring.on_low_score: drop)."""
        return status == "filtered" and self.spec.scoring.on_low_score == "drop"

    def _write_image(
        self,
        writer: ShardWriter,
        run: ShardRun,
        row: Row,
        pixels: np.ndarray,
        score: float | None,
        status: str,
    ) -> dict[str, Any]:
        """Encode one done row's image and hand it to the writer; returns the row's metadata record."""
        with run.timer.timing("image_encode"):
            data = encode_image(pixels, self.spec.output.image_format, self.spec.output.quality)
        record = {
            **self._record(run.shard, row, row.index in run.truncated),
            "sha256": hashlib.sha256(data).hexdigest(),
            "status": status,
            "clip_score": score,
        }
        with run.timer.timing("upload"):
            location = writer.add(row.index, record, data)
        return {**record, **location}

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
            "expanded_prompt": row.expanded_prompt,
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
                n_variants = self.spec.expansion.n_variants if self.spec.expansion else 1
                rows = prepare_rows(table, shard, self.spec.input, self.spec.generation, n_variants)
            run.timeline["read"] = [started, time.time()]
            expansion = self._expansion(rows)  # a pool starts expanding now, before this call's turn
            self.output.prepare_shard(shard.shard_id, self.spec.output.format)
            writer = open_writer(self.spec.output, self.output, shard.shard_id)
            with turn:
                run.timer.add("idle", turn.idle_seconds)
                model_started = time.time()
                self._generate(run, rows, writer, expansion)
                run.timeline["model"] = [model_started, time.time()]

        tick = time.time()
        while run.pending:
            run.collect(run.pending.popleft())
        with run.timer.timing("upload"):
            writer.close()  # tar/parquet formats upload the shard's images here, before its metadata
        drain_seconds = time.time() - tick

        self._write_metadata(shard, rows, run.written, run.truncated, writer)
        errors = Counter(row.error.split(":", 1)[0] for row in rows if row.error)
        statuses = Counter(record["status"] for record in run.written.values())
        scores = [record["clip_score"] for record in run.written.values() if record["clip_score"] is not None]
        seconds = time.time() - started
        stats = {
            "shard_id": shard.shard_id,
            "run_id": self.run_id,
            "input_file": shard.file_url,
            "rows": len(rows),
            "ok": statuses["ok"],
            "filtered": statuses["filtered"],
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
            "clip_score": summarise(scores),
        }
        if expansion is not None:
            stats.update(expand_seconds=round(expansion.seconds, 3), expansion_unchanged=expansion.unchanged)
        if self.run_id is not None:
            check_owner(self.output, self.run_id)  # a run that lost the output commits nothing
        self.output.write_json(OutputLayout.stats_path(shard.shard_id), stats)
        return stats

    def _generate(
        self, run: ShardRun, rows: list[Row], writer: ShardWriter, expansion: ShardExpansion | None
    ) -> None:
        """The generate loop, run while holding the model: each batch's images go to the writer
        threads while the next batch generates, at most BATCHES_IN_FLIGHT batches behind."""
        model_stages = getattr(self.generator, "stage_timer", None)  # None: no split (noop, janus)
        for batch in make_batches(rows, self.spec.workers.batch_size):
            if expansion is not None:
                expansion.fill(batch)
            tick = time.time()
            prompts = [row.text for row in batch]
            run.truncated.update(
                row.index for row, cut in zip(batch, self.generator.truncated(prompts), strict=True) if cut
            )
            try:
                images = self.generator.generate(
                    prompts, [row.negative_prompt for row in batch], [row.seed for row in batch], batch[0].key
                )
                scores = self._score(images, prompts)  # `prompts`: the texts the images were drawn from
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
            statuses = [self._status(score) for score in scores]
            kept = [
                (row, image)
                for row, image, status in zip(batch, pixels, statuses, strict=True)
                if not self._dropped(status)
            ]
            for row, image in kept[: SAMPLES_PER_SHARD - len(run.samples)]:
                run.samples.append(
                    {
                        "id": row.row_id,
                        "prompt": row.prompt,
                        "expanded_prompt": row.expanded_prompt,
                        "seed": row.seed,
                        "thumbnail": thumbnail_data_uri(image),
                    }
                )
            in_flight = []
            for row, image, score, status in zip(batch, pixels, scores, statuses, strict=True):
                if self._dropped(status):
                    record = self._record(run.shard, row, row.index in run.truncated)
                    run.written[row.index] = {**record, "status": status, "clip_score": score}
                else:
                    future = self.writers.submit(self._write_image, writer, run, row, image, score, status)
                    in_flight.append((row, future))
            run.pending.append(in_flight)
            if len(run.pending) > BATCHES_IN_FLIGHT:
                with run.timer.timing("idle"):  # write backpressure: the model waits for the writers
                    run.collect(run.pending.popleft())

    def _expansion(self, rows: list[Row]) -> ShardExpansion | None:
        """The shard's prompt expansion, on this actor or on the expander pool; None without one."""
        spec = self.spec.expansion
        if spec is None:
            return None
        if self.expander is not None:
            submit = functools.partial(functools.partial, self.expander.expand)  # run when waited for
            return ShardExpansion(rows, spec, self.spec.generation.seed, submit, lambda call: call())
        import ray

        turn = itertools.count(random.randrange(len(self.expanders)))  # spreads workers over the pool

        def submit(prompts: list[str], seeds: list[int]) -> Any:
            return self.expanders[next(turn) % len(self.expanders)].expand.remote(prompts, seeds)

        def wait(handle: Any) -> list[str]:
            try:
                return ray.get(handle)
            except ray.exceptions.RayActorError as exc:  # else the driver would take this worker for dead
                raise RuntimeError(f"an expander died and could not be restarted: {exc}") from None

        return ShardExpansion(rows, spec, self.spec.generation.seed, submit, wait)

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
