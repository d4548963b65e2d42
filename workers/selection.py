"""Drawing a batch's images when a row may get more than one: best-of-N candidates and safety retries.

Every image of a row is a *draw*, numbered from 0, with its own seed (`seeds.draw_seed`: draw 0 is the
row's seed). A row gets `generation.candidates` draws per round; with `safety.policy: retry`, a row
whose draws were all flagged gets another round (draws k·round … k·round + k − 1), up to
`1 + safety.retry.attempts` rounds. The draws of every row of the batch still drawing are generated
together, `workers.batch_size` at a time, and scored and checked on the device before the copy back.

The row keeps its best unflagged draw: the highest `select_by` score (generation.candidates > 1), ties
and unscored draws going to the lowest draw number. When every draw was flagged, the final policy
(`keep`, `blur`, `drop`; with retry, `retry.then`) applies to the best flagged draw by the same rule.
With one candidate and no safety section this is exactly one draw per row, batched as the rows are.
The chunks depend only on the batch and the verdicts, so a re-run or a resume draws the same images.

A batch is drawn in two halves, so that the device never waits at a batch boundary (issue #27):
`launch` (on the model thread) queues the batch's work and its copy back on the device and returns
without waiting for them; `choose` (on the shard's thread) waits for that copy back, then picks each
row's image. The model thread meanwhile launches the next batch, whose kernels queue behind this
one's copy back, as the bare diffusers loop's would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import torch

from imagemill.core.images import encoded_size_problem
from imagemill.core.spec import JobSpec, watermark_size_problem
from imagemill.workers.generators.contract import Generator
from imagemill.workers.rows import Row
from imagemill.workers.seeds import draw_seed
from imagemill.workers.stage_timer import DeviceEvent, EventSource, StageTimer, device_events
from imagemill.workers.stages.contract import DrawBatch, StageContext
from imagemill.workers.stages.registry import ActorStages
from imagemill.workers.stages.safety import Verdict, blur


@dataclass
class Draw:
    """One image drawn for a row; `pixels` (uint8 on the CPU, or JPEG bytes encoded on the GPU) only while
    it may be the one kept."""

    draw: int
    seed: int
    clip_score: float | None
    verdict: Verdict | None
    similarity: tuple[float, float] | None = None  # image-to-image: SSIM and PSNR against the source
    features: np.ndarray | None = None  # evaluation: the feature model's embedding (float32, CPU)
    columns: dict[str, Any] = field(default_factory=dict)  # metadata columns stages added (contract.py)
    pixels: np.ndarray | bytes | None = None

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and self.verdict.flagged

    def beats(self, other: Draw | None) -> bool:
        """Better than `other` by score; a tie (or no score) keeps the earlier draw, `other`."""
        if other is None:
            return True
        return (
            self.clip_score is not None
            and other.clip_score is not None
            and self.clip_score > other.clip_score
        )

    def record(self) -> dict[str, float | int | None]:
        safety = self.verdict.score if self.verdict is not None else None
        return {"draw": self.draw, "seed": self.seed, "clip_score": self.clip_score, "safety_score": safety}


@dataclass
class Drawn:
    """What a row's draws come to: the image to write (None: none is) and what its metadata says."""

    kept: Draw
    status: str  # ok | filtered | flagged
    pixels: np.ndarray | bytes | None  # as written: blurred where the policy says so
    shown: np.ndarray | None  # the report's thumbnail: blurred whenever flagged; None when not written
    rejected: list[Draw] = field(default_factory=list)  # the row's other draws, in draw order

    @property
    def rejected_json(self) -> str | None:
        return json.dumps([draw.record() for draw in self.rejected]) if self.rejected else None


@dataclass
class _RowDraws:
    row: Row
    draws: list[Draw] = field(default_factory=list)
    best: Draw | None = None  # unflagged
    best_flagged: Draw | None = None

    def add(self, draw: Draw, pixels: np.ndarray | bytes) -> None:
        self.draws.append(draw)
        if draw.flagged:
            if draw.beats(self.best_flagged):
                self.best_flagged = _holding(draw, pixels, self.best_flagged)
        elif draw.beats(self.best):
            self.best = _holding(draw, pixels, self.best)


def _holding(draw: Draw, pixels: np.ndarray | bytes, replaced: Draw | None) -> Draw:
    """`draw`, now holding its pixels; the draw it replaces lets its pixels go."""
    if replaced is not None:
        replaced.pixels = None
    draw.pixels = pixels
    return draw


class BestOfN:
    """The `select` stage: which of a row's draws is kept, and what a flagged or low-scored one
    becomes. Host bookkeeping on the shard's thread, after the copy back, while the next batch draws."""

    section = None  # always: with one candidate and no safety section it keeps the one draw
    needs = ("pixels",)  # and the scores and verdicts, where the stages that add them run
    adds = ()
    changes_pixels = False  # a flagged draw comes blurred or blanked from the safety stage
    columns = ("status", "draw", "rejected_draws")

    def __init__(self, spec: JobSpec):
        self.candidates = spec.generation.candidates
        self.rounds = spec.safety.draws if spec.safety else 1
        self.flagged_policy = spec.safety.final_policy if spec.safety else "keep"
        self.threshold = spec.scoring.threshold if spec.scoring else None
        self.drop_filtered = spec.scoring is not None and spec.scoring.on_low_score == "drop"

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls(spec)

    def choose(self, state: _RowDraws) -> Drawn:
        kept = state.best or state.best_flagged
        assert kept is not None  # every row drew at least once
        rejected = [draw for draw in state.draws if draw is not kept]
        pixels = kept.pixels
        if kept.flagged:  # the safety stage already blurred (blur) or blanked (drop) its pixels
            if self.flagged_policy == "drop":
                return Drawn(kept, "flagged", None, None, rejected)
            # the report's thumbnail of a flagged image is blurred whatever the policy
            shown = (
                pixels if self.flagged_policy == "blur" else blur(torch.from_numpy(pixels[None])).numpy()[0]
            )
            return Drawn(kept, "flagged", pixels, shown, rejected)
        filtered = (
            kept.clip_score is not None and self.threshold is not None and kept.clip_score < self.threshold
        )
        written = None if filtered and self.drop_filtered else pixels
        return Drawn(kept, "filtered" if filtered else "ok", written, written, rejected)


@dataclass
class Launched:
    """A batch whose draws are queued on the device, copy back included, which may still be running."""

    states: list[_RowDraws]
    started: DeviceEvent | None  # recorded before the batch's first launch; None on the CPU
    copied: DeviceEvent | None  # recorded after its last copy back; None on the CPU
    launch_seconds: float  # the host's time launching it: all of the batch's time on the CPU
    launch_ended: float  # perf_counter() when its launch returned

    def model_seconds(self) -> float:
        """The batch's time on the model, once its copy back is done (waits for it, without the GIL):
        on a device, from the device reaching its first launch to finishing its copy back (what it
        spent waiting for launches inside the batch included, time before it reached the batch
        not); on the CPU, where the launch is the work, the launch's own time."""
        if self.started is None or self.copied is None:
            return self.launch_seconds
        self.copied.synchronize()
        return self.started.elapsed_time(self.copied) / 1000


class Selection:
    """Draws the images of one batch of rows at a time on one actor, runs the device stages on each
    chunk of draws in the registry's order (`launch`), and chooses each row's image (`choose`)."""

    def __init__(self, spec: JobSpec, generator: Generator, device: str, stages: ActorStages):
        self.generator = generator
        self.device = device
        self.stages = stages
        self.on_batches = stages.on_batches()
        choice = stages.get("select")
        assert isinstance(choice, BestOfN)  # the table's `select` row
        self.choice = choice
        self.image_to_image = spec.input.image_column is not None
        self.output = spec.output
        self.inpainting = spec.input.mask_column is not None
        self.batch_size = spec.workers.batch_size
        model_timer = generator.stage_timer  # its device's events, shared by the stages on that device
        self.events: EventSource | None = model_timer.events if model_timer else device_events(device)
        self.timer = StageTimer(self.events)

    def _event(self) -> DeviceEvent | None:
        """A device event recorded now, in the device's order; None on the CPU."""
        if self.events is None:
            return None
        event = self.events()
        event.record()
        return event

    def launch(self, batch: list[Row]) -> Launched:
        """Queue the drawing of the batch's rows on the device, up to their copy back, without waiting
        for it (a verdict or score a retry round depends on is read when that round needs it). Raises
        the generator's ValueError for a batch it refuses."""
        tick = time.perf_counter()
        started = self._event()
        states = [_RowDraws(row) for row in batch]
        drawing = states
        candidates = self.choice.candidates
        for round_number in range(self.choice.rounds):
            first = round_number * candidates
            todo = [(state, first + c) for state in drawing for c in range(candidates)]
            for start in range(0, len(todo), self.batch_size):
                self._draw_chunk(todo[start : start + self.batch_size])
            drawing = [state for state in drawing if state.best is None]
            if not drawing:
                break
        for state in states:
            state.row.source_pixels = state.row.mask_pixels = state.row.reference_pixels = None  # drawn
        copied = self._event()
        ended = time.perf_counter()
        return Launched(states, started, copied, ended - tick, ended)

    def idle_since(self, launched: Launched) -> float:
        """How long the device has been done with `launched` (its copy back), when nothing was queued
        after it; 0 while it is still at work on it. Never waits: on a device, the device's time from
        its copy back to an event recorded now (reached at once on an idle device); on the CPU, the
        host's since its launch returned."""
        if launched.copied is None:
            return time.perf_counter() - launched.launch_ended
        if not launched.copied.query():
            return 0.0
        now = self._event()
        assert now is not None  # a batch with a copy-back event has an event source
        now.synchronize()
        return launched.copied.elapsed_time(now) / 1000

    def choose(self, launched: Launched) -> list[Drawn]:
        """The batch's rows' images, chosen, once its copy back is done (waits for it)."""
        if launched.copied is not None:
            launched.copied.synchronize()
        return [self.choice.choose(state) for state in launched.states]

    def _sources(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Image-to-image: the rows' source images on the device, (N, H, W, 3) uint8, and for
        inpainting their (N, H, W) masks, by `generate`'s argument names; none for text-to-image."""
        given: dict[str, torch.Tensor] = {}
        if self.image_to_image:
            given["sources"] = torch.from_numpy(np.stack([row.source_pixels for row in rows])).to(self.device)
        if self.inpainting:
            given["masks"] = torch.from_numpy(np.stack([row.mask_pixels for row in rows])).to(self.device)
        return given

    def _unwritable(self, images: torch.Tensor) -> str | None:
        """Why the chunk's images, (N, H, W, 3) as the stages left them (upscaled), cannot be written:
        the job's size rules, checked against the job's size when the spec loaded, checked again on
        the size an image has (enhance-only's `resize: keep` takes any source size; an upscaler
        multiplies it). The batch's rows become `model_rejected`, as for a size a model refuses."""
        height, width = images.shape[1:3]
        problem = encoded_size_problem(width, height, self.output.image_format)
        if problem is None and self.output.watermark is not None:
            problem = watermark_size_problem(width, height)
            problem = problem and f"output.watermark {problem}"
        return problem

    def _wait_for_host_images(self) -> None:
        """Before a stage computes on images in host memory that a device writes (the emulated
        accelerator's, which torch's CPU kernels do not queue behind), wait for the device to have
        written them; a CUDA stage queues behind the generator's kernels instead, and on the CPU the
        images are made before `generate` returns (no events: nothing to wait for)."""
        if (event := self._event()) is not None:
            event.synchronize()

    def _draw_chunk(self, chunk: list[tuple[_RowDraws, int]]) -> None:
        rows = [state.row for state, _ in chunk]
        numbers = [number for _, number in chunk]
        seeds = [draw_seed(row.seed, number) for row, number in zip(rows, numbers, strict=True)]
        with_sources = self._sources(rows)
        negatives = [row.negative_prompt for row in rows]
        texts = [row.text for row in rows]
        images = self.generator.generate(texts, negatives, seeds, rows[0].key, **with_sources)
        drawn = DrawBatch(rows, numbers, seeds, images, **with_sources)
        for name, stage in self.on_batches:
            if name != "copy_back" and not images.is_cuda:
                self._wait_for_host_images()
            with self.timer.timing(name):
                stage.run(drawn)
        problem = self._unwritable(drawn.images)
        if problem:
            raise ValueError(problem)
        for i, (state, number) in enumerate(chunk):
            draw = Draw(
                number,
                drawn.seeds[i],
                drawn.clip_scores[i],
                drawn.verdicts[i],
                drawn.similarities[i],
                drawn.features[i],
                drawn.columns[i],
            )
            state.add(draw, drawn.pixels[i])
