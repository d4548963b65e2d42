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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.device_jpeg import DeviceJpeg
from imagemill.workers.generators.contract import Generator
from imagemill.workers.image_similarity import similarity
from imagemill.workers.rows import Row
from imagemill.workers.seeds import draw_seed
from imagemill.workers.stages.evaluation import FeatureModel
from imagemill.workers.stages.safety import SafetyChecker, Verdict, blur
from imagemill.workers.stages.scoring import ClipScorer


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


class Selection:
    """Draws, scores, checks and chooses the images of one batch of rows at a time, on one actor."""

    def __init__(
        self,
        spec: JobSpec,
        generator: Generator,
        device: str,
        scorer: ClipScorer | None,
        checker: SafetyChecker | None,
        features: FeatureModel | None = None,
        device_jpeg: DeviceJpeg | None = None,
    ):
        self.generator, self.scorer, self.checker = generator, scorer, checker
        self.features = features  # evaluation: each draw's embedding by the feature model
        self.device_jpeg = device_jpeg  # set only when no draw's pixels are needed on the CPU
        self.device = device
        self.image_to_image = spec.input.image_column is not None
        self.candidates = spec.generation.candidates
        self.rounds = spec.safety.draws if spec.safety else 1
        self.flagged_policy = spec.safety.final_policy if spec.safety else "keep"
        self.batch_size = spec.workers.batch_size
        self.threshold = spec.scoring.threshold if spec.scoring else None
        self.drop_filtered = spec.scoring is not None and spec.scoring.on_low_score == "drop"

    def draw(self, batch: list[Row]) -> list[Drawn]:
        """The batch's rows' images, chosen. Raises the generator's ValueError for a batch it refuses."""
        states = [_RowDraws(row) for row in batch]
        drawing = states
        for round_number in range(self.rounds):
            first = round_number * self.candidates
            todo = [(state, first + c) for state in drawing for c in range(self.candidates)]
            for start in range(0, len(todo), self.batch_size):
                self._draw_chunk(todo[start : start + self.batch_size])
            drawing = [state for state in drawing if state.best is None]
            if not drawing:
                break
        for state in states:
            state.row.source_pixels = None  # drawn: the source is no longer needed
        return [self._chosen(state) for state in states]

    def _sources(self, rows: list[Row]) -> torch.Tensor | None:
        """Image-to-image: the rows' source images on the device, (N, H, W, 3) uint8; None for
        text-to-image."""
        if not self.image_to_image:
            return None
        return torch.from_numpy(np.stack([row.source_pixels for row in rows])).to(self.device)

    def _draw_chunk(self, chunk: list[tuple[_RowDraws, int]]) -> None:
        rows = [state.row for state, _ in chunk]
        seeds = [draw_seed(row.seed, number) for row, (_, number) in zip(rows, chunk, strict=True)]
        texts = [row.text for row in rows]
        sources = self._sources(rows)
        negatives = [row.negative_prompt for row in rows]
        with_sources = {} if sources is None else {"sources": sources}
        images = self.generator.generate(texts, negatives, seeds, rows[0].key, **with_sources)
        similarities = similarity(sources, images) if sources is not None else [None] * len(rows)
        embeddings = self.scorer.image_embeddings(images) if self.scorer else None
        scores = self.scorer.score_embeddings(embeddings, texts) if self.scorer else [None] * len(rows)
        verdicts = self.checker.check(images, embeddings) if self.checker else [None] * len(rows)
        features = self.features.embed(images) if self.features else [None] * len(rows)
        # the copy back: uint8 pixels, or the JPEG bytes nvJPEG made of them on the device
        pixels = images.cpu().numpy() if self.device_jpeg is None else self.device_jpeg.encode(images)
        for (state, number), seed, score, verdict, similar, embedded, image in zip(
            chunk, seeds, scores, verdicts, similarities, features, pixels, strict=True
        ):
            state.add(Draw(number, seed, score, verdict, similar, embedded), image)

    def _chosen(self, state: _RowDraws) -> Drawn:
        kept = state.best or state.best_flagged
        rejected = [draw for draw in state.draws if draw is not kept]
        pixels = kept.pixels
        if kept.flagged:
            shown = blur(torch.from_numpy(pixels[None])).numpy()[0]
            written = {"keep": pixels, "blur": shown, "drop": None}[self.flagged_policy]
            return Drawn(kept, "flagged", written, None if written is None else shown, rejected)
        filtered = (
            kept.clip_score is not None and self.threshold is not None and kept.clip_score < self.threshold
        )
        written = None if filtered and self.drop_filtered else pixels
        return Drawn(kept, "filtered" if filtered else "ok", written, written, rejected)
