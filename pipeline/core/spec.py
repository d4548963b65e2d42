"""The job spec: one YAML file, validated by pydantic, every field overridable with `--set key=value`.

The spec is the whole contract of a job: the driver, the actors and the job record all read it, so
a field added here is the one place a new setting needs to be declared.
"""

from __future__ import annotations

import copy
import os
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imagemill.core.errors import ImagemillError
from imagemill.core.kinds import KIND_NAMES, KINDS

ImageFormat = Literal["png", "jpeg", "webp"]
OutputFormat = Literal["files", "webdataset", "parquet"]
Quantization = Literal["none", "int8_weight_only", "int8_dynamic", "fp8"]
IMAGE_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
DATE_FIELD = "{date}"
# Where and how expansion runs, not what it writes: left out of the fingerprint, free to change on resume.
EXPANSION_RUNTIME_FIELDS = {
    "storage_options",
    "safetensors_only",
    "placement",
    "num_workers",
    "num_gpus",
    "num_cpus",
}
# Absent from the fingerprint without best-of-N: outputs made before it existed still resume.
BEST_OF_N_FIELDS = {"candidates", "select_by"}
# speed: fields that change where compiled code is kept, not the output: out of the fingerprint
SPEED_RUNTIME_FIELDS = {"compile_cache", "compile_cache_storage_options"}
# speed.cache: the settings each kind takes
CACHE_KIND_SETTINGS = {
    "first_block": {"threshold"},
    "faster_cache": {"skip_range"},
    "pyramid": {"skip_range"},
    "taylorseer": {"interval", "warm_up_steps"},
}
# Image-to-image generation settings: in the fingerprint only for a job with input.image_column.
IMAGE_TO_IMAGE_GENERATION_FIELDS = {"strength", "resize"}
# Limits of the generation parameters, for a job's defaults (GenerationSpec) and each row's own values
# (workers/rows.py) alike: a default every row would fail on is refused before anything runs.
MAX_SIDE = 4096  # larger images are refused instead of exhausting the accelerator's memory
MAX_STEPS = 1000
# diffusers takes any guidance and makes black images far past the useful range (7.5 for SD, 3.5 for
# FLUX's distilled guidance, 5 for Janus); 0 is what turbo models use (no classifier-free guidance).
MAX_GUIDANCE = 100
# What generation.select_by may name: a score the job computes for every image (scoring:'s CLIP score).
SELECTORS = ("clip_score",)


# The watermark's payload and the size it needs, for the spec and the actors (workers/provenance) alike.
MAX_WATERMARK_BITS = 64  # measured: 64 bits read back with at most 2 wrong from 256² images after JPEG q90
MIN_WATERMARK_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
ALLOWED_BIT_ERRORS_PER = 16  # found: at most one wrong bit in 16 (workers/provenance/watermark.py)
# Each bit value must make up this share of a payload: the decoder reads constant bits from smooth images.
MIN_PAYLOAD_BIT_SHARE = 0.25


def payload_bits(payload: str) -> list[int]:
    """The bits of a payload: `0x` + hex digits, or text as UTF-8. ValueError when it is empty, is not
    hex after `0x`, is longer than MAX_WATERMARK_BITS, or is low-entropy (fewer than
    MIN_PAYLOAD_BIT_SHARE of its bits 0, or 1): verify would find it in never-watermarked images."""
    if payload[:2].lower() == "0x":
        try:
            data = bytes.fromhex(payload[2:])
        except ValueError:
            raise ValueError(f"{payload!r} starts with 0x but is not an even number of hex digits") from None
    else:
        data = payload.encode("utf-8")
    bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
    if not bits or len(bits) > MAX_WATERMARK_BITS:
        raise ValueError(
            f"the payload must be 1 to {MAX_WATERMARK_BITS} bits (8 bytes of text, or 0x and 16 hex "
            f"digits), got {len(bits)}"
        )
    ones = sum(bits)
    if min(ones, len(bits) - ones) < len(bits) * MIN_PAYLOAD_BIT_SHARE:
        raise ValueError(
            f"{payload!r} is a low-entropy payload ({ones} of its {len(bits)} bits are 1): a smooth, "
            "never-watermarked image reads back near-constant bits and would match it; use one with at "
            f"least {MIN_PAYLOAD_BIT_SHARE:.0%} of its bits 0 and as many 1"
        )
    return bits


def watermark_size_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot carry the watermark, or None when it can."""
    if width * height < MIN_WATERMARK_PIXELS:
        return f"needs images of at least {MIN_WATERMARK_PIXELS} pixels (256x256), got {width}x{height}"
    return None


# Sources with more pixels are invalid_image rows (Pillow itself only warns from 89M, refuses from 179M).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generation_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be the generation parameter `name` ("<name> must be ..., got <value>"), or
    None when it can: the one rule for job defaults and per-row values."""
    if name == "num_inference_steps" and not (_is_int(value) and 0 < value <= MAX_STEPS):
        return f"num_inference_steps must be in 1..{MAX_STEPS}, got {value!r}"
    if name == "guidance_scale" and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_GUIDANCE
    ):  # NaN fails the comparison too
        return f"guidance_scale must be a number in 0..{MAX_GUIDANCE}, got {value!r}"
    if name == "strength" and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
    ):
        return f"strength must be a number in (0, 1], got {value!r}"
    if name in ("width", "height") and not (_is_int(value) and 0 < value <= MAX_SIDE and value % 8 == 0):
        return f"{name} must be a multiple of 8 in 8..{MAX_SIDE}, got {value!r}"
    return None


def denoising_problem(num_inference_steps: Any, strength: Any) -> str | None:
    """Why an image-to-image row would run no denoising step, or None. SD-family pipelines run
    int(steps × strength) of the steps (and fail on none); one rule for every family keeps it simple."""
    if int(num_inference_steps * strength) < 1:
        return (
            f"strength {strength} x num_inference_steps {num_inference_steps} runs no denoising step; "
            "raise either so that their product is at least 1"
        )
    return None


class _Section(BaseModel):
    # strict: `true` is no batch size and "8" no width; no NaN or infinity, which JSON records cannot hold
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InputSpec(_Section):
    path: str = Field(
        description="Parquet file, folder or glob; local path or any fsspec URL (s3://, gs://)."
    )
    prompt_column: str = "prompt"
    id_column: str = Field(
        "id", description="Used when present in the input; otherwise ids are derived from file and row."
    )
    rows_per_shard: int = Field(
        1024, gt=0, description="Row groups are grouped into shards of about this many rows."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    carry_columns: list[str] | Literal["*"] = Field(
        default_factory=list,
        description="Input columns copied, with their Arrow types, into the metadata, the WebDataset JSON "
        'and the parquet format\'s rows; "*": every column but the prompt and id columns and names the '
        "outputs already have (imagemill.core.carry).",
    )
    label_column: str | None = Field(
        None,
        description="The carried column whose values are the labels counted per label; default: `label` "
        "when a column of that name is carried.",
    )
    image_column: str | None = Field(
        None,
        description="Image-to-image: the column holding each row's source image, as bytes or as a path "
        "relative to the input file's folder (see workers/source_images.py).",
    )
    allow_absolute_image_paths: bool = Field(
        False, description="Also open source paths that are absolute or URLs (any bucket, any protocol)."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="Source images with more pixels are invalid_image rows."
    )

    @model_validator(mode="after")
    def _label_is_carried(self) -> InputSpec:
        columns = self.carry_columns
        if columns != "*" and len(set(columns)) != len(columns):
            raise ValueError("carry_columns names a column twice")
        if self.label_column is not None and columns != "*" and self.label_column not in columns:
            raise ValueError(
                f"label_column '{self.label_column}' is not carried: add it to input.carry_columns"
            )
        return self

    def label(self) -> str | None:
        """The label column (input.label_column, or `label` when a column of that name is carried;
        with "*", when the input has one)."""
        if self.label_column is not None:
            return self.label_column
        return "label" if self.carry_columns == "*" or "label" in self.carry_columns else None


class WatermarkSpec(_Section):
    """An invisible watermark (the invisible-watermark library) in every image's pixels."""

    payload: str = Field(
        description="Text (UTF-8) or hex with a 0x prefix: at most "
        f"{MAX_WATERMARK_BITS} bits (8 text bytes, 16 hex digits)."
    )
    method: Literal["dwtDctSvd", "dwtDct"] = Field(
        "dwtDctSvd",
        description="dwtDctSvd survives a JPEG q90 re-encode (measured); dwtDct (SDXL's) is 3x faster "
        "but loses bits on textured images.",
    )

    @field_validator("payload")
    @classmethod
    def _payload_fits(cls, value: str) -> str:
        payload_bits(value)  # raises ValueError naming the limit
        return value


class C2paSpec(_Section):
    """C2PA manifests signed with the user's certificate chain and key (read by the actors only)."""

    cert: str = Field(description="PEM certificate chain (signer first), a local path or fsspec URL.")
    key: str = Field(description="PEM private key of the signing certificate, a local path or fsspec URL.")
    alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="The signature algorithm, matching the key."
    )
    timestamp_url: str | None = Field(None, description="An RFC 3161 time-stamp authority, or none.")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)


class OutputSpec(_Section):
    path: str = Field(description="Output root; local path or any fsspec URL.")
    format: OutputFormat = Field(
        "files",
        description="files: one image file per row; webdataset: one tar per shard; "
        "parquet: one Parquet file per shard with an `image` column (Hugging Face datasets).",
    )
    image_format: ImageFormat = "png"
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality; ignored for PNG.")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    allow_existing: bool = Field(
        False,
        description="Write into a folder that already holds files imagemill did not write (they are never "
        "deleted); without it, a new job's output must be a new or empty folder.",
    )
    embed_parameters: bool = Field(
        True, description="Generation parameters (A1111 `parameters` + JSON) and IPTC AI labels in each file."
    )
    watermark: WatermarkSpec | None = None
    c2pa: C2paSpec | None = None

    def provenance_fingerprint(self) -> dict[str, Any]:
        """What goes into each file besides its pixels' encoding. Absent when off, as outputs made before
        it have none; C2PA's certificate and key are who signs (renewed certificates resume), not what."""
        fingerprint: dict[str, Any] = {"embed_parameters": True} if self.embed_parameters else {}
        if self.watermark is not None:
            fingerprint["watermark"] = self.watermark.model_dump()
        if self.c2pa is not None:
            fingerprint["c2pa"] = {"alg": self.c2pa.alg}
        return fingerprint

    @field_validator("path")
    @classmethod
    def _path_is_given(cls, value: str) -> str:
        if not value.strip():  # resolved as a local path, it would become the working directory
            raise ValueError("is empty: name the folder or URL the job writes to")
        return value


class LoraSpec(_Section):
    source: str = Field(
        description="LoRA weights: a .safetensors file, a directory, a hub id, or a directory's fsspec URL."
    )
    weight_name: str | None = Field(
        None, description="The weights file inside a directory or hub repo; default: diffusers' guess."
    )
    scale: float = Field(1.0, description="How strongly the LoRA applies (its adapter weight).")


class SchedulerSpec(_Section):
    """A diffusers scheduler to sample with instead of the pipeline's own; the driver checks the name
    and settings before the job starts (workers/generators/diffusion/schedulers.py)."""

    name: str = Field(description="A diffusers scheduler class, e.g. EulerAncestralDiscreteScheduler.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings over the pipeline's scheduler config, e.g. use_karras_sigmas: true.",
    )


class ModelSpec(_Section):
    source: str = Field("", description="Hub id, local directory, or fsspec URL of a directory.")
    kind: Literal[KIND_NAMES] = Field(  # the kinds of workers/generators/registry.py
        "diffusers",
        description="; ".join(f"{info.name}: {info.description}" for info in KINDS.values()),
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: one GPU per worker where the cluster has GPUs, else CPU."
    )
    safetensors_only: bool = Field(
        True, description="Refuse pickled (.bin/.pt) weights, which can run code when loaded."
    )
    quantization: Quantization = Field(
        "none",
        description="torchao weight quantisation of the denoiser's linear layers; fp8 needs a GPU of "
        "compute capability 8.9 or newer.",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    lora: list[LoraSpec] = Field(
        default_factory=list, description="LoRA adapters, all active together; URLs use storage_options."
    )
    scheduler: SchedulerSpec | None = Field(
        None, description="The diffusers scheduler (sampler) to use; default: the pipeline's own."
    )


class ScoringSpec(_Section):
    """A CLIP score (image-text) per image, computed on the actor after generation."""

    source: str = Field(
        description="A transformers CLIPModel directory (tokenizer and image processor config beside it), "
        "hub id or URL, found as model.source is."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    safetensors_only: bool = True
    threshold: float | None = Field(
        None, description="Images scoring below it get status `filtered`; null: score only."
    )
    on_low_score: Literal["keep", "drop"] = Field(
        "keep", description="keep: the filtered row's image is written; drop: only its metadata row is."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)


class SafetyRetrySpec(_Section):
    """`safety.policy: retry`: how many new seeds a flagged image gets, and what happens after."""

    attempts: int = Field(2, gt=0, le=16, description="New draws (seeds) tried after the first is flagged.")
    then: Literal["drop", "blur", "keep"] = Field(
        "drop", description="What happens to a row still flagged after its last attempt."
    )


class SafetySpec(_Section):
    """A safety classifier run on each image on the actor, before the copy back (workers/stages/safety.py)."""

    source: str = Field(
        description="A diffusers StableDiffusionSafetyChecker directory (config.json, safetensors weights, "
        "preprocessor_config.json), hub id or URL, found as model.source is."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    safetensors_only: bool = True
    policy: Literal["keep", "blur", "drop", "retry"] = Field(
        "blur",
        description="A flagged image is written and marked (keep), written blurred (blur), not written "
        "(drop), or drawn again with a new seed (retry).",
    )
    retry: SafetyRetrySpec = Field(default_factory=SafetyRetrySpec)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def draws(self) -> int:
        """Rounds of drawing a row may get: 1, or 1 + retry.attempts with policy retry."""
        return 1 + self.retry.attempts if self.policy == "retry" else 1

    @property
    def final_policy(self) -> str:
        """What happens to an image flagged on its row's last round: keep, blur or drop."""
        return self.retry.then if self.policy == "retry" else self.policy


EVALUATION_LATER_FIELDS = ("leakage", "reference_label_column")


class EvaluationSpec(_Section):
    """Dataset evaluation (workers/stages/evaluation.py, imagemill.evaluation.post_pass): every written
    image is embedded by a feature model on the actor; the driver merges the shards' feature statistics into
    FID/KID against a reference, diversity and near-duplicates."""

    features: Literal["clip", "pixels", "inception"] = Field(
        "clip",
        description="clip: a CLIP model's image embeddings (needs `source`); pixels: each image downscaled "
        "to 16x16, centred, needs no weights (diversity and near-duplicates where no trained feature model "
        "exists; its FID/KID are not comparable to published FID); inception: the FID Inception-v3's 2048 "
        "pool features (needs `source`), and the Inception Score.",
    )
    source: str | None = Field(
        None,
        description="features: clip: a transformers CLIPModel directory (with preprocessor_config.json), "
        "hub id or URL, found as model.source is; its image embeddings are the features. features: "
        "inception: torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or that state dict as "
        ".safetensors), or a folder holding it; a path or URL, never downloaded from elsewhere.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    safetensors_only: bool = True
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    reference: str | None = Field(
        None,
        description="Real images to compare with: a folder of image files, a Parquet file or folder with an "
        "`image` column, or precomputed statistics in clean-fid's .npz layout (mu, sigma; no KID then).",
    )
    reference_storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    kid_sample: int = Field(1000, gt=1, description="Embeddings per side in KID's seeded sample.")
    diversity_sample: int = Field(
        500, gt=1, description="Embeddings per label in the diversity's seeded sample."
    )
    duplicate_threshold: float = Field(
        0.98, gt=0, le=1, description="Cosine similarity at or above which two images are near-duplicates."
    )
    seed: int = Field(0, description="Seeds the KID and diversity samples.")
    leakage: bool = Field(
        False,
        description="Mark generated images at or above duplicate_threshold cosine to a reference image "
        "(leakage.parquet); needs a reference of images.",
    )
    reference_label_column: str | None = Field(
        None,
        description="The reference Parquet's label column: per-label FID/KID then compare a label's images "
        "with that label's reference images.",
    )

    @model_validator(mode="after")
    def _reference_of_images(self) -> EvaluationSpec:
        for name in ("leakage", "reference_label_column"):
            if getattr(self, name) and (self.reference is None or self.reference.endswith(".npz")):
                given = "precomputed statistics (.npz)" if self.reference else "no reference"
                raise ValueError(
                    f"{name} needs a reference of images, not {given}: set evaluation.reference to a "
                    "folder of images or Parquet files with an `image` column"
                )
        return self

    @model_validator(mode="after")
    def _source_of_the_features(self) -> EvaluationSpec:
        if self.features == "clip" and self.source is None:
            raise ValueError("features: clip needs evaluation.source (a CLIPModel), or set features: pixels")
        if self.features == "inception" and self.source is None:
            raise ValueError("features: inception needs evaluation.source (the Inception-v3 weights file)")
        if self.features == "pixels" and self.source is not None:
            raise ValueError("evaluation.source does not apply to features: pixels (no weights): remove it")
        return self


class CacheSpec(_Section):
    """`speed.cache`: diffusers' step caching on the denoiser (workers/generators/diffusion/caching.py)."""

    kind: Literal["first_block", "faster_cache", "pyramid", "taylorseer"]
    threshold: float = Field(
        0.05, gt=0, description="first_block: other blocks skipped while the first one's output changes less."
    )
    skip_range: int = Field(
        2, ge=2, description="pyramid, faster_cache: attention computed every N steps, reused between."
    )
    interval: int = Field(
        2, ge=2, description="taylorseer: a full step every N steps, Taylor predictions between."
    )
    warm_up_steps: int = Field(2, ge=1, description="taylorseer: full steps before predicting.")

    @model_validator(mode="after")
    def _settings_of_the_kind(self) -> CacheSpec:
        stray = self.model_fields_set - {"kind"} - CACHE_KIND_SETTINGS[self.kind]
        if stray:
            raise ValueError(f"{', '.join(sorted(stray))} do not apply to kind: {self.kind}")
        return self


class SpeedSpec(_Section):
    """How a diffusers model runs (workers/generators/diffusion/speed.py); each may change output bytes
    a little."""

    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="sdpa: diffusers' default (PyTorch scaled_dot_product_attention); eager: classic."
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels-last memory format.")
    compile: bool = Field(
        False, description="torch.compile the denoiser; batches are padded to batch_size (static shapes)."
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend: inductor, or e.g. cudagraphs, aot_eager (debugging)."
    )
    tiny_vae: str | None = Field(
        None, description="AutoencoderTiny (TAESD) hub id, local dir or URL that replaces the VAE decoder."
    )
    cache: CacheSpec | None = Field(None, description="Step caching of the denoiser (FLUX transformers).")
    compile_cache: str | None = Field(
        None,
        description="Folder or URL where compiled denoisers are kept, per model, torch, device and shape; "
        "later actors load them instead of compiling.",
    )
    compile_cache_storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @model_validator(mode="after")
    def _compile_cache_needs_compile(self) -> SpeedSpec:
        if self.compile_cache and not self.compile:
            raise ValueError("compile_cache keeps compiled code: it needs compile: true")
        return self


class GenerationSpec(_Section):
    """Job-wide defaults; the input columns of the same names override them per row."""

    width: int = 512
    height: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int = Field(0, description="Job seed: a row without a seed column gets one derived from it.")
    images_per_prompt: int = Field(
        1, gt=0, le=1000, description="Images per input row, each with its own id (<id>_<k>) and seed."
    )
    candidates: int = Field(
        1,
        gt=0,
        le=64,
        description="Best-of-N: images drawn per row (seeds derived per candidate); the best is kept.",
    )
    select_by: str = Field(
        SELECTORS[0], description=f"What picks the best candidate: {', '.join(SELECTORS)} (needs `scoring:`)."
    )

    @field_validator("select_by")
    @classmethod
    def _selector_exists(cls, value: str) -> str:
        if value not in SELECTORS:
            raise ValueError(
                f"{value!r} is not a selector imagemill has: the only one is {', '.join(SELECTORS)} "
                "(the scoring: section's CLIP score); an aesthetic selector would need an aesthetic model"
            )
        return value

    strength: float | list[float] = Field(
        0.8,
        description="Image-to-image: how far from its source an image may go; [low, high]: drawn per row "
        "from the row's seed (to 0.01). A `strength` input column overrides it per row.",
    )
    resize: Literal["center_crop", "pad", "stretch"] = Field(
        "center_crop", description="Image-to-image: how a source is brought to the row's width and height."
    )

    @field_validator("strength", mode="before")
    @classmethod
    def _strength_meets_the_row_rule(cls, value: Any) -> Any:
        """A number or a [low, high] range of numbers, each meeting the row rule."""
        ends = value if isinstance(value, list) else [value]
        problem = next(filter(None, (generation_problem("strength", end) for end in ends)), None)
        if problem:
            raise ValueError(problem)
        if isinstance(value, list) and (len(value) != 2 or value[0] > value[1]):
            raise ValueError(f"a strength range is [low, high] with low <= high, got {value!r}")
        return value

    @field_validator("width", "height", "num_inference_steps", "guidance_scale", mode="before")
    @classmethod
    def _meets_the_row_rule(cls, value: Any, info: ValidationInfo) -> Any:
        problem = generation_problem(info.field_name, value)
        if problem:
            raise ValueError(problem)
        return value


class WorkersSpec(_Section):
    num_workers: int | None = Field(
        None, gt=0, description="Actors to start; default: one per GPU, or one per CPU without GPUs."
    )
    # "auto": the largest power of two that fits the device, found by the first actor to load and
    # recorded in the job's fingerprint (imagemill.workers.batch_fit, imagemill.planning.auto_batch).
    batch_size: int | Literal["auto"] = 8
    num_cpus_per_worker: float = Field(1, gt=0)
    max_shard_attempts: int = Field(3, gt=0)
    # Budgets over all runs of the output (imagemill.execution.budget): no new shard once reached. Not in the
    # fingerprint, so a resume may raise them.
    max_gpu_hours: float | None = Field(None, gt=0, description="device-hours: GPU-, or CPU-hours on CPU")
    max_cost_usd: float | None = Field(None, gt=0, description="needs cost.gpu_hour_usd")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_is_a_count_or_auto(cls, value: Any) -> Any:
        """One message for both halves of the union, instead of pydantic's two."""
        if value != "auto" and not (type(value) is int and value > 0):
            raise ValueError(f"must be a whole number above 0, or auto; got {value!r}")
        return value


class CostSpec(_Section):
    """Prices of device time (imagemill.core.cost); they change no output byte, so not in the fingerprint."""

    gpu_hour_usd: float | dict[str, float] | None = Field(
        None, description="USD per device-hour, or per Ray accelerator type: {H100: 3.0, CPU: 0.05}"
    )

    @field_validator("gpu_hour_usd")
    @classmethod
    def _not_negative(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        prices = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(price < 0 for price in prices):
            raise ValueError("prices must be 0 or more")
        return value


class ExpansionSpec(_Section):
    """Prompt expansion: a causal language model rewrites each prompt before it is drawn."""

    source: str = Field(description="Hub id, local directory, or fsspec URL of a transformers causal LM.")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    safetensors_only: bool = True
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    template: str = Field(
        "Describe a photo of {prompt} in one detailed sentence:",
        description="The text the language model continues; {prompt} is replaced by the input prompt.",
    )
    max_new_tokens: int = Field(48, gt=0, le=4096)
    do_sample: bool = Field(False, description="false: greedy; true: sampled, seeded per variant id.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n_variants: int = Field(
        1, gt=0, le=1000, description="Expansions per input row, each its own row with id <id>_v<k>."
    )
    batch_size: int = Field(16, gt=0, description="Prompts per language-model call.")
    placement: Literal["actor", "pool"] = Field(
        "actor", description="actor: in each ShardWorker, on its device; pool: expander actors of its own."
    )
    num_workers: int = Field(1, gt=0, description="pool only: expander actors.")
    num_gpus: float = Field(0, ge=0, description="pool only: GPUs per expander (0: it runs on CPU).")
    num_cpus: float = Field(1, gt=0, description="pool only: CPUs per expander.")

    @field_validator("template")
    @classmethod
    def _template_has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}, where the input prompt goes")
        return value

    @model_validator(mode="after")
    def _variants_need_sampling(self) -> ExpansionSpec:
        if self.n_variants > 1 and not self.do_sample:
            raise ValueError("n_variants > 1 needs do_sample: true, else every variant is the same text")
        return self

    def fill(self, prompt: str) -> str:
        """The template with the prompt in it (str.replace: other braces in the template stay as they are)."""
        return self.template.replace("{prompt}", prompt)


class JobSpec(_Section):
    name: str = "imagemill"
    input: InputSpec
    output: OutputSpec
    model: ModelSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    scoring: ScoringSpec | None = None
    expansion: ExpansionSpec | None = Field(
        None, description="Optional prompt expansion by a language model."
    )
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    safety: SafetySpec | None = Field(None, description="Optional safety classifier and its policy.")
    cost: CostSpec = Field(default_factory=CostSpec)
    evaluation: EvaluationSpec | None = Field(
        None, description="Optional dataset evaluation: features, FID/KID, diversity, near-duplicates."
    )

    @model_validator(mode="after")
    def _candidates_need_their_score(self) -> JobSpec:
        if self.generation.candidates > 1 and self.scoring is None:
            raise ValueError(
                f"generation.candidates: {self.generation.candidates} picks by "
                f"{self.generation.select_by}, which needs a scoring: section (a CLIP model)"
            )
        return self

    @model_validator(mode="after")
    def _watermark_fits_the_images(self) -> JobSpec:
        if self.output.watermark is not None:
            problem = watermark_size_problem(self.generation.width, self.generation.height)
            if problem:
                raise ValueError(f"output.watermark: {problem}")
        return self

    @model_validator(mode="after")
    def _cost_budget_needs_a_price(self) -> JobSpec:
        if self.workers.max_cost_usd is not None and self.cost.gpu_hour_usd is None:
            raise ValueError("workers.max_cost_usd needs cost.gpu_hour_usd, the price it is counted in")
        return self

    @model_validator(mode="after")
    def _auto_batch_is_not_compiled(self) -> JobSpec:
        if self.workers.batch_size == "auto" and self.speed.compile:
            raise ValueError(
                "workers.batch_size: auto cannot go with speed.compile, which compiles for one batch "
                "size at load: set workers.batch_size to a number"
            )
        return self

    @model_validator(mode="after")
    def _model_has_a_source(self) -> JobSpec:
        if KINDS[self.model.kind].needs_model and not self.model.source.strip():
            raise ValueError("model.source is required: a hub id, a local directory or a URL")
        return self

    @model_validator(mode="after")
    def _diffusers_options_need_a_diffusers_model(self) -> JobSpec:
        """LoRA, quantisation, the scheduler and speed options act on a diffusers pipeline; elsewhere
        they would be silently ignored, so they are refused."""
        if not KINDS[self.model.kind].diffusers_options:
            used = [
                name
                for name, is_set in (
                    ("model.lora", bool(self.model.lora)),
                    ("model.quantization", self.model.quantization != "none"),
                    ("model.scheduler", self.model.scheduler is not None),
                    ("speed", bool(self.speed.model_dump(exclude_defaults=True))),
                )
                if is_set
            ]
            if used:
                accepting = ", ".join(info.name for info in KINDS.values() if info.diffusers_options)
                raise ValueError(
                    f"{', '.join(used)} only apply to model.kind: {accepting}, not {self.model.kind}"
                )
        return self

    @model_validator(mode="after")
    def _image_column_needs_diffusers(self) -> JobSpec:
        """Image-to-image drives a diffusers image-to-image pipeline; other kinds would ignore the sources."""
        if self.input.image_column is None:
            return self
        if self.model.kind != "diffusers":
            raise ValueError(f"input.image_column needs model.kind: diffusers, not {self.model.kind}")
        strength = self.generation.strength
        problem = denoising_problem(
            self.generation.num_inference_steps, strength[0] if isinstance(strength, list) else strength
        )
        if problem:
            raise ValueError(f"generation: {problem}")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide what a job's output holds, and so must not change under a resume.

        Not in it: where things are read and written from (storage options), how many workers run,
        and retry limits. The input path is in it, but not the files it holds: new files added to a
        folder are new work for the same job (the nightly case).
        """
        output = self.output.model_dump(include={"format", "image_format", "quality"})
        if output["format"] == "files":
            del output["format"]  # absent means files: outputs made before formats existed still resume
        output.update(self.output.provenance_fingerprint())
        model = self.model.model_dump(
            include={"source", "kind", "dtype", "quantization", "lora", "scheduler"}
        )
        if model["quantization"] == "none":
            del model["quantization"]  # absent means none: outputs made before quantisation still resume
        if not model["lora"]:
            del model["lora"]  # absent means none: outputs made before LoRA support still resume
        if model["scheduler"] is None:
            del model["scheduler"]  # absent means the pipeline's own, as before schedulers could be set
        # carried columns and the label: absent when unset, so outputs made before them still resume
        carried = self.input.model_dump(include={"carry_columns", "label_column"}, exclude_defaults=True)
        fingerprint = {
            "input": self.input.model_dump(include={"path", "prompt_column", "id_column", "rows_per_shard"})
            | carried,
            "output": output,
            "model": model,
            "generation": self.generation.model_dump(
                exclude=IMAGE_TO_IMAGE_GENERATION_FIELDS
                | (BEST_OF_N_FIELDS if self.generation.candidates == 1 else set())
            ),
            "batch_size": self.workers.batch_size,
        }
        if self.scoring is not None:  # absent when off, for the same reason
            fingerprint["scoring"] = self.scoring.model_dump(exclude={"storage_options", "safetensors_only"})
        if self.expansion is not None:  # absent without expansion: outputs made before it still resume
            fingerprint["expansion"] = self.expansion.model_dump(exclude=EXPANSION_RUNTIME_FIELDS)
        if self.safety is not None:  # absent when off: outputs made before it still resume
            fingerprint["safety"] = self.safety.model_dump(exclude={"storage_options", "safetensors_only"})
        if self.input.image_column is not None:  # absent without it: outputs made before it still resume
            sources = {"image_column", "allow_absolute_image_paths", "max_image_pixels"}
            fingerprint["image_to_image"] = {
                **self.input.model_dump(include=sources),
                **self.generation.model_dump(include=IMAGE_TO_IMAGE_GENERATION_FIELDS),
            }
        if self.evaluation is not None:  # absent when off: outputs made before it still resume
            fingerprint["evaluation"] = self.evaluation.model_dump(
                exclude={"storage_options", "safetensors_only", "reference_storage_options"}
                | {name for name in EVALUATION_LATER_FIELDS if not getattr(self.evaluation, name)}
                | ({"features"} if self.evaluation.features == "clip" else set())
            )  # the fields added later absent at their defaults: outputs made before them still resume
        # where compiled code is kept changes how fast an actor starts, not what it makes
        speed = self.speed.model_dump(exclude_defaults=True, exclude=SPEED_RUNTIME_FIELDS)
        if speed:  # absent means defaults: outputs made before speed options existed still resume
            fingerprint["speed"] = speed
        return fingerprint

    def with_batch_size(self, batch_size: int) -> JobSpec:
        """This spec with `workers.batch_size` resolved (from `auto`) to a number."""
        return self.model_copy(update={"workers": self.workers.model_copy(update={"batch_size": batch_size})})

    def label_column(self) -> str | None:
        """The column per-label features read labels from: the one place that decides it."""
        return self.input.label()

    @property
    def images_per_row(self) -> int:
        """Metadata rows (images) per input row: variants × images per prompt."""
        variants = self.expansion.n_variants if self.expansion else 1
        return variants * self.generation.images_per_prompt

    def redacted(self) -> dict[str, Any]:
        """The spec as a dict with every storage option hidden: safe for logs and the job record."""
        data = self.model_dump()
        if data["output"]["c2pa"]:  # where the signing key is stays out of every record
            data["output"]["c2pa"] = {"alg": self.output.c2pa.alg, "cert": "<redacted>", "key": "<redacted>"}
        for section in ("input", "output", "model", "scoring", "expansion", "safety", "evaluation"):
            if data[section] and data[section]["storage_options"]:
                data[section]["storage_options"] = "<redacted>"
        if data["speed"]["compile_cache_storage_options"]:
            data["speed"]["compile_cache_storage_options"] = "<redacted>"
        if data["evaluation"] and data["evaluation"]["reference_storage_options"]:
            data["evaluation"]["reference_storage_options"] = "<redacted>"
        return data


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    """Relative local paths are resolved against the driver's working directory: actors run elsewhere."""
    return path if _is_url(path) else str(Path(path).expanduser().resolve())


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ImagemillError(f"--set {key}: '{part}' is not a section of the job spec")
        node = child
    node[parts[-1]] = value


class _OverrideLoader(yaml.SafeLoader):
    """YAML for `--set` values whose plain scalars are JSON's: true, false, null and decimal numbers.

    YAML 1.1 (yaml.safe_load) reads 0123 as 83, on/yes/no as booleans and .nan as a float; a setting
    given on the command line must not change like that, so here those stay text. Quotes, flow
    mappings and lists, and explicit tags (!!int 0123) still work as YAML."""


_OverrideLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", r"true|false", "tf"),
    ("null", r"null|~", "n~"),
    ("int", r"-?(?:0|[1-9][0-9]*)", "-0123456789"),
    ("float", r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", "-0123456789"),
):
    _OverrideLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern})$"), list(_first)
    )
# A storage option's value is read as written, except when it starts as YAML that asks for a type.
_TYPED_YAML = ("!!", "'", '"', "{", "[")


def _is_storage_option(key: str) -> bool:
    return "storage_options" in key.split(".")


def _override_value(key: str, raw: str, storage_option: bool) -> Any:
    """The value of one `key=raw`: a storage option's text as written (credentials are text: 0123 must
    not become 83), anything else as YAML with JSON's scalars (see _OverrideLoader)."""
    if storage_option and not raw.startswith(_TYPED_YAML):
        return raw
    if not raw:
        return ""
    try:
        return yaml.load(raw, Loader=_OverrideLoader)  # a SafeLoader: no Python objects
    except (yaml.YAMLError, ValueError):  # ValueError: a tag the text does not fit (!!int abc)
        shown = "its value" if storage_option else f"'{raw}'"  # a storage option's value is never shown
        raise ImagemillError(
            f"--set {key}: {shown} is not a valid YAML value; quote it to pass it as a string"
        ) from None


def parse_overrides(pairs: list[str], storage_options: bool = False) -> list[tuple[str, Any]]:
    """`key.sub=value` strings. Values are YAML with JSON's scalars: 16, 3.5, true, null, "quoted",
    [a, b], {k: v}; other text is a string. Under a `storage_options` key (or every pair, with
    `storage_options`) the value is the text as written, unless it starts with a quote, `{`, `[` or a
    tag (!!bool true); such values never appear in an error message."""
    overrides = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        storage_option = storage_options or _is_storage_option(key)
        if not sep or not key:
            shown = "a storage option" if storage_option else f"'{pair}'"
            raise ImagemillError(f"--set expects key=value (e.g. workers.batch_size=16), got {shown}")
        overrides.append((key, _override_value(key, raw, storage_option)))
    return overrides


def _fill_date(data: dict[str, Any], day: date) -> None:
    """Replace `{date}` in the job name and the input and output paths: one spec serves every night."""
    text = day.isoformat()
    if isinstance(data.get("name"), str):
        data["name"] = data["name"].replace(DATE_FIELD, text)
    for section in ("input", "output"):
        if isinstance(data.get(section), dict) and isinstance(data[section].get("path"), str):
            data[section]["path"] = data[section]["path"].replace(DATE_FIELD, text)


def build_spec(
    data: dict[str, Any],
    overrides: list[tuple[str, Any]] = (),
    origin: str = "job spec",
    day: date | None = None,
) -> JobSpec:
    """Validate a spec dict after applying overrides and the date, and make local paths absolute.

    `day` fills `{date}` (YYYY-MM-DD) in the name and paths; it defaults to today in UTC.
    """
    data = copy.deepcopy(data)  # overrides must not write into the caller's dicts
    for key, value in overrides:
        _set_dotted(data, key, value)
    _fill_date(data, day or datetime.now(UTC).date())
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ImagemillError.invalid(origin, exc) from None
    spec.input.path = _absolute(spec.input.path).rstrip("/")
    spec.output.path = _absolute(spec.output.path).rstrip("/")
    for model in (spec.model, spec.scoring, spec.expansion, spec.safety):
        if model is not None and model.source and _looks_like_local_path(model.source):
            model.source = _absolute(model.source)
    for lora in spec.model.lora:
        if _looks_like_local_path(lora.source):
            lora.source = _absolute(lora.source)
    if spec.output.c2pa is not None:  # read by the actors, which may run elsewhere
        c2pa = spec.output.c2pa
        c2pa.cert, c2pa.key = (path if _is_url(path) else _absolute(path) for path in (c2pa.cert, c2pa.key))
    if spec.evaluation is not None:
        for name in ("source", "reference"):
            value = getattr(spec.evaluation, name)
            if value and _looks_like_local_path(value):
                setattr(spec.evaluation, name, _absolute(value))
    if spec.speed.tiny_vae and _looks_like_local_path(spec.speed.tiny_vae):
        spec.speed.tiny_vae = _absolute(spec.speed.tiny_vae)
    if spec.speed.compile_cache:  # read and written by the actors
        spec.speed.compile_cache = _absolute(spec.speed.compile_cache)
    return spec


def read_yaml_mapping(path: str | os.PathLike, what: str, holding: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a job spec, a recipe); any problem is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ImagemillError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ImagemillError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ImagemillError(f"{what} {path} must be a YAML mapping with {holding}")
    return data


def load_spec(
    path: str | os.PathLike, overrides: list[tuple[str, Any]] = (), day: date | None = None
) -> JobSpec:
    data = read_yaml_mapping(path, "job spec", "input, output and model sections")
    return build_spec(data, overrides, origin=f"job spec {path}", day=day)
