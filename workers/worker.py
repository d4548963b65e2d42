"""The Ray actor: loads the model once, then turns shard after shard into images, metadata and stats.

Everything a shard produces is staged in its `ShardAttempt` and published from here into the output
by a create-only commit (core/write_gate.py); the driver gets back only the shard's stats. A shard's
life is `process_shard`: read → expand → generate and the post-generation stages (selection.py; the
stages are built from the spec by stages/registry.py) → write → commit. Images go through the shard's
`ShardWriter` (one per output format, see writers.py), then the metadata Parquet, then on commit the
files are published and the stats file last: its presence is the commit.
Two shard calls run at once, taking the model in turn (model_turns.py), so the next shard
is read while the current one generates; the holder's batches are launched on one model thread, the
next queued there while the last is handed to the writers, and its kernels queued behind the last's
copy back (`_generate`); the stats split each shard's time by stage (stage_timer.py).
The records themselves (metadata rows, stats) are built in shard_records.py.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from imagemill.core.carry import append_columns
from imagemill.core.device_ledger import AttemptFailed
from imagemill.core.kinds import kind_info
from imagemill.core.layout import OutputLayout, parquet_bytes
from imagemill.core.records import MetadataRow, ShardStats, commit_shard, metadata_table
from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.core.spec.rules import gang_size
from imagemill.core.stage_table import MODEL_STAGES, STAGE_COLUMN_TYPES
from imagemill.core.write_gate import OwnedOutput, ShardAttempt
from imagemill.workers.batch_fit import keep_to_gpu_share, resolve_batch_size
from imagemill.workers.device_use import device_use
from imagemill.workers.device_warnings import device_warnings
from imagemill.workers.gang import Gang
from imagemill.workers.generators.contract import Generator
from imagemill.workers.model_turns import ModelTurns
from imagemill.workers.rows import Row, carried_of, make_batches, prepare_rows, read_shard
from imagemill.workers.selection import Drawn, Launched, Selection
from imagemill.workers.shard_records import ShardRun
from imagemill.workers.source_images import load_sources
from imagemill.workers.stages.encode import EncodeStage
from imagemill.workers.stages.evaluation import FeatureStage, write_features
from imagemill.workers.stages.expansion import PromptExpander, ShardExpansion
from imagemill.workers.stages.expansion_calls import OnActor, OnPool
from imagemill.workers.stages.registry import build_stages
from imagemill.workers.stages.upscale import UpscaleStage
from imagemill.workers.writers import ShardWriter, open_writer

WRITER_THREADS = 4
# what the model turn's time is charged to, but for `host` (the rest)
TURN_STAGES = (*MODEL_STAGES, "idle")
BATCHES_IN_FLIGHT = 2  # batches encoded/uploaded in the background while the next one generates


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def make_generator(spec: JobSpec, device: str) -> Generator:
    """The generator of the job's model.kind (workers/generators/registry.py), loaded on `device`."""
    return kind_info(spec.model.kind).generator_class().from_spec(spec, device)


class ShardWorker:
    def __init__(
        self,
        spec: JobSpec,
        expanders: list[Any] | None = None,
        run_id: str | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        """`expanders`: handles of the expander actors with `expansion.placement: pool`; `run_id`: the
        run holding the output's lease (None outside a run: writes unchecked, imagemill.testing);
        `on_batch`: told the shard id and the rows drawn so far in it after each batch, for the driver's
        progress (it must not wait on anything: the model waits for it).

        A model that does not load is kept for `ready()` to raise: an actor whose creation fails dies
        printing its traceback and a SIGABRT notice into the driver's output, burying the one-line error.
        """
        self.spec = spec
        self.run_id = run_id
        self.on_batch = on_batch
        self.name: str | None = None  # the actor's name, set by its shell; written in each shard's stats
        self.load_error: Exception | None = None
        self.gang: Gang | None = None  # a context-parallel gang's member, once joined (`join_gang`)
        self.expanders = expanders
        # Every model call runs on this one thread: the load (with its compile warm-up), the holder's
        # draws (`_generate`: the next queued while one runs) and a follower's. State a compiled
        # model keeps per host thread (CUDA graph trees) is then the one the warm-up made.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="imagemill-model")
        if gang_size(spec.workers.gpus_per_worker, spec.model.parallel) == 1:  # else: in `join_gang`
            self._load_or_keep_the_error()

    def _load_or_keep_the_error(self) -> None:
        try:
            self.model_thread.submit(self._load, self.spec, self.expanders).result()
        except Exception as exc:
            self.load_error = exc

    def _load(self, spec: JobSpec, expanders: list[Any] | None) -> None:
        self.device = pick_device(spec.model.device)
        keep_to_gpu_share(spec, self.device)  # before any weight lands on a GPU others share
        self.device_use = device_use(self.device, spec)
        self.generator = make_generator(spec, self.device)
        # the post-generation stages the spec enables, in the stage table's order (stages/registry.py)
        self.stages = build_stages(spec, self.device, self.generator)
        encode = self.stages.get("image_encode")
        assert isinstance(encode, EncodeStage)  # the table's writer-thread stage
        self.encode = encode
        self.expanders = expanders or []
        self.expander = (
            PromptExpander(spec.expansion, self.device)
            if spec.expansion is not None and spec.expansion.placement == "actor"
            else None
        )
        # `auto` → a number, probed with every other model of the job already on the device
        spec = self.spec = resolve_batch_size(spec, self.generator, self.device)
        self.selection = Selection(spec, self.generator, self.device, self.stages)
        layout = OutputLayout(spec.output.path, spec.output.storage_options)
        self.output = OwnedOutput(layout, self.run_id)  # every write goes through it (core/write_gate.py)
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="imagemill-writer")
        self.turns = ModelTurns()

    def ready(self) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        return {
            "device": self.device,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "batch_size": self.spec.workers.batch_size,
            "device_use": self.device_use,  # the driver charges an attempt that dies without a report
            # settings slow or unsupported on this device: the driver shows each distinct line once
            "warnings": device_warnings(self.spec, self.device),
            # processes each image's denoiser tokens are cut over (model.parallel: context in a gang)
            "token_slices": self.generator.token_slices,
        }

    def join_gang(self, address: str, rank: int, world_size: int, followers: list[Any]) -> dict[str, Any]:
        """Join this replica's gang (imagemill.workers.gang), then load the model: a context-parallel
        denoiser splits its tokens over the group it finds at load (generators/diffusion/layout.py).
        `ready()`'s answer: a member whose model does not load fails every member's, the leader's
        (the replica's) with that member's error."""
        self.gang = Gang(address, rank, world_size, pick_device(self.spec.model.device), followers)
        self._load_or_keep_the_error()
        try:
            self.gang.agree_loaded(self.load_error)
        except Exception as exc:  # another member's load failed: so does this replica's start
            self.load_error = exc
        return self.ready()

    def follow_shard(self, shard: Shard, batch_size: int) -> int:
        """A gang follower's part of a shard its leader runs: the same rows, the leader's batches, its
        expanded prompts and the same seeds, drawn in step with the leader (`Gang.step` after each
        batch); nothing is written. Returns the rows drawn."""
        assert self.gang is not None
        run = ShardRun(shard, self.spec.model.source)
        self._read(run)
        return self.model_thread.submit(self._follow, run, batch_size).result()

    def _follow(self, run: ShardRun, batch_size: int) -> int:
        """On the model thread: a follower's draws of a shard, in step with its leader's (a batch the
        model refuses is still a step: its rows become model_rejected errors, written by no one)."""
        batches = make_batches(run.rows, batch_size)
        for batch in batches:
            if (launched := self._draw_on_model_thread(run, batch)) is not None:
                self._finish_draw(run, launched)
        return sum(len(batch) for batch in batches)

    def process_shard(self, shard: Shard) -> ShardStats:
        """Read, expand, generate, score, write and commit one shard; returns its stats. An error is
        raised as `AttemptFailed`, with the device time the attempt held.

        Two calls run at once on the actor (`max_concurrency` in the scheduler): while one holds the
        model for its generate loop, the other reads and validates its shard, or drains its writes
        and writes its metadata and commit. Everything per shard lives in this call's `ShardRun`; the
        actor's shared parts are the model (held in turn), the writer thread pool and the output.
        """
        run = ShardRun(shard, self.spec.model.source, self.generator.scheduler_name)
        attempt = self.output.attempt(shard.shard_id)  # a run that lost the output starts none
        try:
            with self.turns.ticket() as turn:
                self._read(run)
                run.expansion = self._start_expansion(run.rows)  # a pool starts now, before this turn
                publication = self.encode.encoder.publication  # one per actor: the model hashed once
                writer = open_writer(self.spec.output, attempt, publication, run.carried)
                with turn:
                    run.timer.add("idle", turn.idle_seconds)
                    timed_before = run.timer.total(TURN_STAGES)
                    model_started = time.time()
                    try:
                        gang = self.gang.leading(shard, self.spec.workers.batch_size) if self.gang else None
                        with gang or nullcontext():
                            self._generate(run, writer)
                    finally:  # a turn that fails has held the device too
                        run.timeline["model"] = [model_started, time.time()]
                        run.held_seconds = turn.idle_seconds + run.timeline["model"][1] - model_started
                    timed = run.timer.total(TURN_STAGES) - timed_before
                    run.timer.add("host", max(0.0, run.timeline["model"][1] - model_started - timed))
            self._finish_writes(run, writer)
            self._write_metadata(run, writer, attempt)
            self._write_features(run, attempt)
            return self._commit(run, attempt)
        except Exception as exc:
            # The attempt's device time goes to the driver with its error (imagemill.core.device_ledger).
            error_type = type(exc).__name__
            raise AttemptFailed(str(exc), error_type, self.device_use.charge(run.held_seconds)) from exc
        finally:
            attempt.discard()

    def _read(self, run: ShardRun) -> None:
        """Read the shard's row groups and resolve and validate its rows (invalid ones become errors)."""
        with run.timer.timing("read"):
            table = read_shard(run.shard, self.spec.shard_input())
            n_variants = self.spec.expansion.n_variants if self.spec.expansion else 1
            run.rows = prepare_rows(table, run.shard, self.spec.input, self.spec.generation, n_variants)
            run.carried = carried_of(table, run.rows, run.shard, self.spec.input)
            label = self.spec.label_column()  # with carry_columns "*", absent from an input without it
            run.label_column = label if label in run.carried.table.column_names else None
            spec = self.spec
            if spec.input.image_column or spec.input.reference_column:
                load_sources(run.rows, run.shard.file_url, spec.input, spec.generation, self._upscale)
        run.timeline["read"] = [run.started, time.time()]

    @property
    def _upscale(self) -> int | None:
        """The upscaler's scale (the size a row's reference must be); None without `upscale:`."""
        stage = self.stages.get("upscale")
        return stage.upscaler.scale if isinstance(stage, UpscaleStage) else None

    def _start_expansion(self, rows: list[Row]) -> ShardExpansion | None:
        """The shard's prompt expansion, on this actor or on the expander pool; None without one."""
        if self.spec.expansion is None:
            return None
        calls = OnActor(self.expander) if self.expander is not None else OnPool(self.expanders)
        return ShardExpansion(rows, self.spec.expansion, self.spec.generation.seed, calls.submit, calls.wait)

    def _generate(self, run: ShardRun, writer: ShardWriter) -> None:
        """The generate loop, run while holding the model: each batch is expanded, then launched on the
        model thread (generated and scored on the device, up to its copy back), and its images go to
        the writer threads while the next batch generates.

        The next batch's launch is queued on the model thread before this one is handed over, and the
        model thread does not wait for a batch's copy back (this thread does, in `_hand_off`): the
        next batch's kernels are queued behind it, so the device goes from one batch straight to the
        next (issue #27: on the emulated device at 60 images/s the wait at each batch boundary cost
        1% of the device in process, bench/gpu_loss.py), and the hand-off to the writers, the
        progress call, the writer backpressure and the next batch's expansion run on this thread
        while the device works. One batch is launched ahead, no more (two batches' images on the
        device at most): its rows are the next in shard order, so the batches and seeds, and the
        images, are those of the loop without it."""
        drawing: deque[tuple[list[Row], Future[Launched | None]]] = deque()
        done = 0
        try:
            for batch in make_batches(run.rows, self.spec.workers.batch_size):
                if run.expansion is not None:
                    run.expansion.fill(batch)
                drawing.append((batch, self.model_thread.submit(self._draw_on_model_thread, run, batch)))
                if len(drawing) > 1:
                    done = self._hand_off(run, writer, *drawing.popleft(), done, ahead=drawing[0][1])
            while drawing:
                done = self._hand_off(run, writer, *drawing.popleft(), done, ahead=None)
        finally:  # a failed turn leaves no draw running into the next shard's turn
            for _, future in drawing:
                future.cancel()
            wait([future for _, future in drawing])

    def _draw_on_model_thread(self, run: ShardRun, batch: list[Row]) -> Launched | None:
        """The batch launched on the model thread (None: refused, see `_draw`). A gang's members,
        leader and followers alike, come through here: they agree on its expanded prompts before and
        step together after each batch, on this thread, so the group's calls keep one order."""
        if self.gang is not None and self.spec.expansion is not None:
            self.gang.agree_prompts(batch)
        launched = self._draw(run, batch)
        if self.gang is not None:
            self.gang.step(len(batch))
        return launched

    def _hand_off(
        self,
        run: ShardRun,
        writer: ShardWriter,
        batch: list[Row],
        future: Future[Launched | None],
        done: int,
        ahead: Future[Launched | None] | None,
    ) -> int:
        """Wait for a batch's draw, copy back included, and hand its images to the writers; returns
        the rows drawn so far. `ahead`: the batch launched after it, if any."""
        launched = future.result()
        if launched is not None:
            drawn = self._finish_draw(run, launched)
            self._write(run, writer, batch, drawn, ahead)
        done += len(batch)
        if self.on_batch is not None:
            self.on_batch(run.shard.shard_id, done)
        return done

    def _draw(self, run: ShardRun, batch: list[Row]) -> Launched | None:
        """The batch launched: its images generated, scored and safety-checked on the model's device and
        their copy back queued (selection.py: candidates and retries drawn too). None when the
        pipeline's own checks refused the batch's parameters: its rows become `model_rejected`
        errors (the time of the refused launch is the model's: `denoise`)."""
        tick = time.perf_counter()
        cut = self.generator.truncated([row.text for row in batch])
        run.truncated.update(row.index for row, truncated in zip(batch, cut, strict=True) if truncated)
        try:
            return self.selection.launch(batch)
        except ValueError as exc:
            for row in batch:
                row.error = f"model_rejected: {exc}"
            self._charge_model_time(run, time.perf_counter() - tick)
            return None

    def _finish_draw(self, run: ShardRun, launched: Launched) -> list[Drawn]:
        """The launched batch's rows' images, chosen, once its copy back is done (waits for it), with
        the batch's model time charged."""
        self._charge_model_time(run, launched.model_seconds())
        with run.timer.timing("select"):
            return self.selection.choose(launched)

    def _charge_model_time(self, run: ShardRun, seconds: float) -> None:
        """Charge a batch's `seconds` on the model to its stages: text encoding and decoding as the
        generator timed them (none for noop and janus), the post-generation stages as the selection
        timed them, denoising the rest. Only the stages the device has finished are taken: the next
        batch's, launched meanwhile, go to its own charge (the shard's totals are exact)."""
        model_stages = self.generator.stage_timer
        inner = model_stages.take(reached_only=True) if model_stages else {}
        for stage, spent in self.selection.timer.take(reached_only=True).items():
            inner[stage] = inner.get(stage, 0.0) + spent
        for stage, spent in inner.items():
            run.timer.add(stage, spent)
        run.timer.add("denoise", seconds - sum(inner.values()))

    def _write(
        self,
        run: ShardRun,
        writer: ShardWriter,
        batch: list[Row],
        drawn: list[Drawn],
        ahead: Future[Launched | None] | None = None,
    ) -> None:
        """Hand the batch's images to the writer threads, at most BATCHES_IN_FLIGHT batches behind the
        model; a row without an image to write (dropped) gets its metadata row only. A wait for the
        writers (backpressure: the next launch waits to be queued) is charged to `idle` for the time
        the device then sat without work: after the batch launched `ahead` was done (no batch ahead:
        all of it)."""
        shown = [(row, row_drawn.shown) for row, row_drawn in zip(batch, drawn, strict=True)]
        run.add_samples(shown, self.writers.submit)
        run.count_draws(drawn)
        in_flight = []
        for row, row_drawn in zip(batch, drawn, strict=True):
            run.stage_columns[row.index] = row_drawn.kept.columns
            if row_drawn.pixels is None:
                run.written[row.index] = run.drawn_row(row, row_drawn)
            else:
                if row_drawn.kept.features is not None:  # evaluation: the written image's embedding
                    run.embeddings[row.index] = row_drawn.kept.features
                in_flight.append((row, self.writers.submit(self._write_image, writer, run, row, row_drawn)))
        run.pending.append(in_flight)
        if len(run.pending) <= BATCHES_IN_FLIGHT:
            return
        started = time.perf_counter()
        run.collect(run.pending.popleft())
        waited = time.perf_counter() - started
        run.timer.add("idle", waited if ahead is None else min(waited, self._idle_behind(ahead)))

    def _idle_behind(self, ahead: Future[Launched | None]) -> float:
        """How long the device has had nothing to do since the batch launched `ahead`; 0 while that
        launch runs or the device still works on it; without waiting for either."""
        if not ahead.done() or ahead.cancelled() or ahead.exception() is not None:
            return 0.0
        launched = ahead.result()
        return math.inf if launched is None else self.selection.idle_since(launched)

    def _write_image(self, writer: ShardWriter, run: ShardRun, row: Row, drawn: Drawn) -> MetadataRow:
        """On a writer thread: encode one done row's image and hand it to the writer; returns the
        row's metadata."""
        record = run.drawn_row(row, drawn)
        with run.timer.timing("image_encode"):  # watermark (read back), encode, C2PA signature
            encoded = self.encode.encode(drawn.pixels, record)
        sha256 = hashlib.sha256(encoded.data).hexdigest()
        record = replace(record, sha256=sha256, watermark_ok=encoded.watermark_ok)
        with run.timer.timing("upload"):
            return writer.add(row.index, record, encoded.data)

    def _finish_writes(self, run: ShardRun, writer: ShardWriter) -> None:
        """Wait for the shard's last writes; tar/parquet formats upload the shard's images here."""
        tick = time.time()
        while run.pending:
            run.collect(run.pending.popleft())
        with run.timer.timing("upload"):
            writer.close()
        run.write_wait_seconds = time.time() - tick

    def _write_metadata(self, run: ShardRun, writer: ShardWriter, attempt: ShardAttempt) -> None:
        rows = run.metadata_rows()
        carried = run.carried.take(range(len(rows)))
        table = metadata_table(rows, writer.format_columns)
        table = append_columns(append_columns(table, self._stage_columns(run)), carried)
        attempt.write(OutputLayout.metadata_path(run.shard.shard_id), parquet_bytes(table))

    def _stage_columns(self, run: ShardRun) -> pa.Table:
        """The columns registered stages add to the metadata (none for the table's own stages, whose
        columns are MetadataRow's): each written row's kept draw's values, null for the others."""
        done = {index: run.stage_columns.get(index, {}) for index in run.written}
        names = self.stages.new_columns

        def typed(name: str) -> pa.DataType | None:  # the table's type; a stage registered at run time infers
            alias = STAGE_COLUMN_TYPES.get(name)
            return None if alias is None else pa.type_for_alias(alias)

        return pa.table(
            {
                name: pa.array([done.get(row.index, {}).get(name) for row in run.rows], typed(name))
                for name in names
            }
        )

    def _write_features(self, run: ShardRun, attempt: ShardAttempt) -> None:
        """With `evaluation:`, the embeddings and feature sums of the rows whose image was written."""
        stage = self.stages.get("features")
        if not isinstance(stage, FeatureStage):
            return
        kept = [row for row in run.rows if getattr(run.written.get(row.index), "path", None)]
        embeddings = np.array([run.embeddings[row.index] for row in kept]).reshape(-1, stage.model.dim)
        labels = [run.label(row) for row in kept]
        ids = [row.row_id for row in kept]
        write_features(attempt, ids, labels, embeddings, stage.model)

    def _commit(self, run: ShardRun, attempt: ShardAttempt) -> ShardStats:
        """Publish the attempt's files create-only, then the shard's stats: its commit. A run that lost
        the output publishes nothing; a path holding another run's bytes fails it (core/write_gate.py)."""
        with run.timer.timing("upload"):  # the staged files into the output, then the stats last
            attempt.publish()
        stats = run.stats(self.device, self.run_id, self.device_use)
        stats.worker = self.name
        return commit_shard(attempt, stats)
