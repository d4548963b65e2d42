"""What a post-generation stage is: the `Stage` protocol and the `DrawBatch` the device stages share.

A stage is built once per actor from the spec (`from_spec`: None when the spec does not enable it)
and is one row of the stage table (imagemill.core.stage_table), which gives its name (timer key and
report label) and its thread. The registry (registry.py) builds the enabled stages in the table's
order and checks that each one's `needs` are on the batch by then.

Threads (why the device does not wait on the host):
- `device` stages (`BatchStage`) run on the actor's model thread, for the shard call that holds the
  model, between generate calls, once per chunk of draws: they take the images where the generator
  left them (a CUDA tensor) and queue more device work; only small results (scores, verdicts,
  embeddings) and, last, the `copy_back` stage's uint8 pixels or nvJPEG bytes cross to the host, once
  per chunk. `select`
  (best-of-N and the safety policy) is bookkeeping over those host values on the same thread.
- `writer` stages run on the writer threads: they get one kept row's host pixels (or bytes) and its
  metadata row (`Drawn`, handed over through the writer pool, at most BATCHES_IN_FLIGHT batches
  behind the model) and do the CPU-heavy work (watermark, encode, sign, upload) while the device
  draws the next batch. Nothing on a writer thread touches a device tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import torch

from imagemill.core.spec import JobSpec
from imagemill.workers.rows import Row

if TYPE_CHECKING:
    from imagemill.workers.generators.contract import Generator
    from imagemill.workers.stages.safety import Verdict


@dataclass
class DrawBatch:
    """One chunk of draws through the device stages: the draws' rows and numbers, the images the
    generator made, and what each stage added. Lists have one entry per draw."""

    rows: list[Row]
    numbers: list[int]  # each draw's number for its row (selection.py)
    seeds: list[int]
    images: torch.Tensor  # (N, H, W, 3) uint8 on the model's device; a pixel-changing stage replaces it
    sources: torch.Tensor | None = None  # image-to-image: the rows' sources on the device
    masks: torch.Tensor | None = None  # inpainting: the rows' (N, H, W) uint8 masks on the device
    clip_embeddings: torch.Tensor | None = None  # score: the CLIP image embeddings (safety reuses them)
    clip_scores: list[float | None] = field(default_factory=list)
    verdicts: list[Verdict | None] = field(default_factory=list)
    similarities: list[tuple[float, float] | None] = field(default_factory=list)
    features: list[np.ndarray | None] = field(default_factory=list)
    # safety: the draws the policy drops; their `images` are blanked, later stages skip them (`live`)
    dropped: list[bool] = field(default_factory=list)
    pixels: list[np.ndarray | bytes] = field(default_factory=list)  # copy_back: on the host
    columns: list[dict[str, Any]] = field(default_factory=list)  # metadata columns stages add per draw

    # the fields the batch has before any stage runs; a stage's `needs` are these or earlier `adds`
    GIVEN: ClassVar[tuple[str, ...]] = ("rows", "numbers", "seeds", "images", "sources", "masks", "dropped")

    def __post_init__(self) -> None:
        n = len(self.rows)
        self.clip_scores = self.clip_scores or [None] * n
        self.verdicts = self.verdicts or [None] * n
        self.similarities = self.similarities or [None] * n
        self.features = self.features or [None] * n
        self.dropped = self.dropped or [False] * n
        self.columns = self.columns or [{} for _ in range(n)]

    @property
    def texts(self) -> list[str]:
        return [row.text for row in self.rows]

    @property
    def live(self) -> list[int]:
        """The draws still in play: not dropped by the safety policy. A stage that makes something
        of a draw (an embedding, a larger image) makes it of these only."""
        return [i for i, dropped in enumerate(self.dropped) if not dropped]


@dataclass(frozen=True)
class StageContext:
    """What a stage may be built from besides the spec: the actor's device and generator, and the
    stages built before it (by table name), whose models it may share."""

    device: str
    generator: Generator
    built: Mapping[str, Stage]


@runtime_checkable
class Stage(Protocol):
    """A post-generation stage: declared by its class, built per actor by `from_spec`."""

    section: ClassVar[str | None]  # the JobSpec section that enables it; None: the stage always runs
    needs: ClassVar[tuple[str, ...]]  # DrawBatch fields it reads
    adds: ClassVar[tuple[str, ...]]  # DrawBatch fields it writes
    changes_pixels: ClassVar[bool]  # whether the images written may differ from the generator's
    columns: ClassVar[tuple[str, ...]]  # metadata columns it fills (MetadataRow fields, or new ones)

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None: ...


@runtime_checkable
class BatchStage(Stage, Protocol):
    """A `device`-thread stage run on each chunk of draws, in table order."""

    def run(self, batch: DrawBatch) -> None: ...


class ModelStage:
    """A stage that is one model loaded from its spec section: built by `load(settings, device)` when
    the job's spec has the section `section` (scoring's CLIP, the evaluation's feature model)."""

    section: ClassVar[str]
    load: ClassVar[Callable[[Any, str], Any]]  # the model's class, from (its section, the device)

    def __init__(self, model: Any):
        self.model = model

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        settings = getattr(spec, cls.section)
        return None if settings is None else cls(cls.load(settings, context.device))
