"""The actor's stages, in the order a shard goes through them: the one table of their names and labels.

Each row is a stage of a shard's `stage_seconds` (workers/stage_timer.py): its name is the key there,
its label the job report's, and its thread says where its work runs, which decides whether its
seconds count as the model's (records.MODEL_STAGES): `device` stages run on the shard call that holds
the model, between generate calls, so the device waits for them; `writer` stages run on the writer
threads while the next batch generates; `shard` is the shard call's own thread, outside the model's calls.

The post-generation rows are also the actor's stage registry: `implementation` names the class
(`module:Class`) that imagemill.workers.stages.registry builds from the spec, in this order. It is a
string so that the driver, which may not import imagemill.workers, reads the same table; adding a
post-generation stage adds one row here (docs/ARCHITECTURE.md, "Adding a post-generation stage").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Thread = Literal["shard", "device", "writer"]


@dataclass(frozen=True)
class StageRow:
    name: str  # the stage_seconds key and the timer's name
    label: str  # what the job report calls it
    thread: Thread
    implementation: str | None = None  # post-generation stages: the `module:Class` the actor builds
    # metadata columns the stage adds beyond MetadataRow's, as (name, Arrow type alias): here so that
    # the driver reserves them, and no carried input column takes one of their names; typed so that a
    # shard where no row has a value (all dropped or rejected) writes the same schema as the others
    columns: tuple[tuple[str, str], ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        """Its class's `columns`."""
        return tuple(name for name, _ in self.columns)


GENERATION = (
    StageRow("read", "read and validate the shard", "shard"),
    StageRow("text_encode", "text encoding (model)", "device"),
    StageRow("denoise", "denoising (model)", "device"),
    StageRow("decode", "VAE decode (model)", "device"),
)
# Built from the spec in this order; a stage may use what the stages before it added to the batch.
POST_GENERATION = (
    StageRow(
        "similarity",
        "SSIM and PSNR against the source (device)",
        "device",
        "imagemill.workers.image_similarity:SimilarityStage",
    ),
    StageRow("score", "CLIP score (device)", "device", "imagemill.workers.stages.scoring:ScoringStage"),
    StageRow("safety", "safety check (device)", "device", "imagemill.workers.stages.safety:SafetyStage"),
    StageRow(
        "upscale",
        "super-resolution (device)",
        "device",
        "imagemill.workers.stages.upscale:UpscaleStage",
        (
            ("upscaler", "string"),
            ("upscaler_sha256", "string"),
            ("upscale_scale", "int64"),
            ("upscale_tile", "int64"),
        ),
    ),
    StageRow(
        "reference",
        "SSIM and PSNR against the high-resolution reference (device)",
        "device",
        "imagemill.workers.image_similarity:ReferenceStage",
        (("reference_ssim", "float64"), ("reference_psnr", "float64")),
    ),
    StageRow(
        "features",
        "evaluation features (device)",
        "device",
        "imagemill.workers.stages.evaluation:FeatureStage",
    ),
    StageRow(
        "copy_back",
        "copy back to the host (nvJPEG on the device where it runs)",
        "device",
        "imagemill.workers.device_jpeg:CopyBackStage",
    ),
    StageRow(
        "select",
        "best-of-N and safety policy (host, while the next batch draws)",
        "shard",
        "imagemill.workers.selection:BestOfN",
    ),
    StageRow(
        "image_encode",
        "image encoding (writer threads)",
        "writer",
        "imagemill.workers.stages.encode:EncodeStage",
    ),
)
AFTER = (
    StageRow("upload", "upload (writer threads)", "writer"),
    # the model turn's time in no device stage: cutting batches, seeds, handing batches to the writers
    StageRow("host", "host work between the model's calls (the device waits)", "shard"),
    StageRow("idle", "model idle, waiting for a read or for writes", "shard"),
)
ACTOR_STAGES = GENERATION + POST_GENERATION + AFTER

STAGE_NAMES = tuple(row.name for row in ACTOR_STAGES)
STAGE_ROWS = {row.name: row for row in ACTOR_STAGES}
STAGE_COLUMNS = tuple(column for row in POST_GENERATION for column in row.column_names)  # reserved names
STAGE_COLUMN_TYPES = {name: alias for row in POST_GENERATION for name, alias in row.columns}
STAGE_LABELS = {row.name: row.label for row in ACTOR_STAGES}
# The stages the device is held busy in: the model's own and the post-generation stages run between
# its generate calls (their seconds were part of `denoise` before they were timed apart).
MODEL_STAGES = tuple(row.name for row in ACTOR_STAGES if row.thread == "device")
