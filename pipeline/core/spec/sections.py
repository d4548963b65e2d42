"""The sections of a job spec: each one pydantic model, with its fields' validation and description.

Field markers (imagemill.core.spec.markers) say what redaction, the fingerprint and log hiding do with a
field; the descriptions are the reference page's text (docs/spec.md, imagemill.core.spec.reference).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imagemill.core.image_folder import IMAGE_SUFFIXES, LISTING_IMAGE_COLUMN
from imagemill.core.kinds import KIND_NAMES, KINDS
from imagemill.core.spec.markers import NOT_FINGERPRINTED, Private, StorageOptions
from imagemill.core.spec.rules import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_MASK_RADIUS,
    MAX_WATERMARK_BITS,
    SELECTORS,
    generation_problem,
    payload_bits,
)

ImageFormat = Literal["png", "jpeg", "webp"]
OutputFormat = Literal["files", "webdataset", "parquet"]
EmbedParameters = Literal["public", "full", "none"]  # what published files say: provenance/publication.py
Quantization = Literal["none", "int8_weight_only", "int8_dynamic", "fp8"]
Parallel = Literal["none", "components", "context"]  # how a replica's GPUs share the model
Offload = Literal["none", "model", "group", "sequential"]  # where weights wait between uses
Dtype = Literal["float32", "float16", "bfloat16"]
IMAGE_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# speed.cache: the settings each kind takes
CACHE_KIND_SETTINGS = {
    "first_block": {"threshold"},
    "faster_cache": {"skip_range"},
    "pyramid": {"skip_range"},
    "taylorseer": {"interval", "warm_up_steps"},
}


def _count_or_auto(value: Any) -> Any:
    """One message for both halves of `int | "auto"`, instead of pydantic's two."""
    if value != "auto" and not (type(value) is int and value > 0):
        raise ValueError(f"must be a whole number above 0, or auto; got {value!r}")
    return value


CountOrAuto = Annotated[int | Literal["auto"], BeforeValidator(_count_or_auto)]


class _Section(BaseModel):
    # strict: `true` is no batch size and "8" no width; no NaN or infinity, which JSON records cannot hold
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PretrainedSection(_Section):
    """A section that names pretrained weights (model, scoring, safety, expansion, evaluation): where
    they are, in what precision they load, whether pickled files may load, and how their URL is read.
    Subclasses redeclare `source` with what it must be; the driver checks it (imagemill.core.model_source)
    against `weights_file` before any actor starts."""

    # The file save_pretrained writes at the top of the source's directory, and what that directory is.
    weights_file: ClassVar[tuple[str, str]] = ("config.json", "a transformers model")

    source: str = Field(description="Hub id, local directory, or fsspec URL of a directory.")
    dtype: Dtype = Field("float32", description="The precision the weights are loaded in.")
    safetensors_only: Annotated[bool, NOT_FINGERPRINTED] = Field(
        True, description="Refuse pickled (.bin/.pt) weights, which can run code when loaded."
    )
    storage_options: StorageOptions


class InputSpec(_Section):
    """The prompts: Parquet files, one row per prompt (columns of generation parameters override the
    job's defaults per row)."""

    path: str = Field(
        description="Parquet file, folder (searched for *.parquet) or glob (*.parquet files and files "
        "starting with PAR1); local path or any fsspec URL (s3://, gs://). With format: images, a folder "
        "(searched recursively), glob or bucket prefix of images."
    )
    format: Literal["parquet", "images"] = Field(
        "parquet",
        description="parquet: rows of prompts (and sources). images: the path's image files "
        f"({', '.join(IMAGE_SUFFIXES)}, any case) are the rows, each its own source, without prompts "
        "(model.kind: none); each run lists the images it has not listed before into the output's "
        "_input/ folder, each one's id its path relative to the folder.",
    )
    prompt_column: str | None = Field(
        "prompt",
        description="The column holding the prompts; null: none (model.kind: none only, whose rows are "
        "their source images).",
    )
    id_column: str = Field(
        "id", description="Used when present in the input; otherwise ids are <file>-<row number>."
    )
    # "auto": cut by imagemill.planning.auto_cut from the input's row count and the worker count, and
    # recorded in the job's fingerprint as the number, so a resume keeps the cut it began with.
    rows_per_shard: CountOrAuto = Field(
        "auto",
        description="Row groups are grouped (or cut) into shards of about this many rows. auto: about 4 "
        "shards per worker (input rows ÷ (4 × workers)), never fewer rows than a batch unless that would "
        "leave a worker idle, rounded up to whole batches, at most 1024, and lowered where the row groups "
        "would still leave a worker without a shard; a resume keeps the recorded cut.",
    )
    storage_options: StorageOptions
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
    scale_column: str | None = Field(
        None,
        description="upscale: the column holding each row's scale (an integer 2-8 dividing the upscaler's: "
        "x2 from an x4 model is its output reduced by a box filter); null values take the upscaler's own.",
    )
    mask_column: str | None = Field(
        None,
        description="Inpainting: the column holding each row's mask (white: repaint, black: keep), as bytes "
        "or a path read as image_column's are; the same size as the row's source. Needs image_column.",
    )
    reference_column: str | None = Field(
        None,
        description="upscale: the column holding each row's known high-resolution image (tests, demos), as "
        "bytes or a path read as image_column's are; each written image's reference_ssim and "
        "reference_psnr are measured against it. It must be the upscaled image's size "
        "(generation.width x height times the row's scale); null: the row is not measured. Needs upscale:.",
    )
    allow_absolute_image_paths: bool = Field(
        False, description="Also open source paths that are absolute or URLs (any bucket, any protocol)."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="Source images with more pixels are invalid_image rows."
    )

    @model_validator(mode="before")
    @classmethod
    def _images_are_the_sources(cls, data: Any) -> Any:
        """With format: images the listing's paths are the sources and there are no prompts: those
        settings are implied, and another value for them is refused in one line naming it."""
        if not isinstance(data, dict) or data.get("format") != "images":
            return data
        implied = {"prompt_column": None, "image_column": LISTING_IMAGE_COLUMN, "mask_column": None}
        for name, value in implied.items():
            if data.get(name) not in (None, value):
                raise ValueError(
                    f"input.{name}: {data[name]!r} does not apply to input.format: images (each listed image "
                    "is its row's source, with no prompt or mask); remove it, or list the images in a "
                    "Parquet file with those columns"
                )
        return {**data, **implied}

    @model_validator(mode="after")
    def _mask_has_a_source(self) -> InputSpec:
        if self.mask_column is not None and self.image_column is None:
            raise ValueError("mask_column masks the source images: set input.image_column too")
        return self

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
    on_unreadable: Literal["keep", "mark", "retry"] = Field(
        "mark",
        description="mark: the actor reads each watermark back from the encoded file and records "
        "`watermark_ok` (false where it does not read back; counted in the report); retry: as mark, but "
        "an image it does not read back from is embedded once more with the levels pulled 8 in from "
        "pure black and white (which cannot carry it), then read back again; keep: no read-back "
        "(`watermark_ok` empty), which saves one decode per image.",
    )

    @field_validator("payload")
    @classmethod
    def _payload_fits(cls, value: str) -> str:
        payload_bits(value)  # raises ValueError naming the limit
        return value


class C2paSpec(_Section):
    """C2PA manifests signed with the user's certificate chain and key (read by the actors only)."""

    cert: Private = Field(description="PEM certificate chain (signer first), a local path or fsspec URL.")
    key: Private = Field(
        description="PEM private key of the signing certificate, a local path or fsspec URL."
    )
    alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="The signature algorithm, matching the key."
    )
    timestamp_url: Annotated[str | None, NOT_FINGERPRINTED] = Field(
        None, description="An RFC 3161 time-stamp authority, or none."
    )
    storage_options: StorageOptions


class OutputSpec(_Section):
    """Where the images and their metadata go, and what each image file holds."""

    path: Annotated[str, NOT_FINGERPRINTED] = Field(description="Output root; local path or any fsspec URL.")
    format: OutputFormat = Field(
        "files",
        description="files: one image file per row; webdataset: one tar per shard; "
        "parquet: one Parquet file per shard with an `image` column (Hugging Face datasets).",
    )
    image_format: ImageFormat = Field("png", description="The image files' encoding.")
    quality: int = Field(
        90,
        ge=1,
        le=100,
        description="JPEG/WebP quality; ignored for PNG (JPEG on CUDA is encoded on the GPU).",
    )
    storage_options: StorageOptions
    allow_existing: Annotated[bool, NOT_FINGERPRINTED] = Field(
        False,
        description="Write into a folder that already holds files imagemill did not write (they are never "
        "deleted); without it, a new job's output must be a new or empty folder.",
    )
    embed_parameters: EmbedParameters = Field(
        "public",
        description="What published files (images' parameters, WebDataset JSON, parquet-format columns) "
        "say. public: generation parameters (A1111 `parameters` + JSON) and the IPTC AI label, with no "
        "bucket or local path (input file by name, model by hub id or content hash); full: also the "
        "paths; none: bare image files. The metadata Parquet keeps everything.",
    )
    watermark: WatermarkSpec | None = Field(
        None, description="An invisible watermark in every image's pixels, e.g. {payload: nightly1}."
    )
    c2pa: C2paSpec | None = Field(
        None,
        description="C2PA manifests signed with your certificate, e.g. {cert: s3://keys/chain.pem, "
        "key: s3://keys/key.pem}.",
    )

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


class EmulationSpec(_Section):
    """`model.kind: emulated`: a GPU emulated on the CPU (workers/generators/emulated.py), to measure how
    busy imagemill keeps a device at a given rate without one."""

    images_per_second: float = Field(gt=0, description="The emulated device's rate at the job's image size.")
    launch_ms_per_step: float = Field(
        2.0,
        ge=0,
        description="Python work per denoising step, holding the GIL, on an uncontended core (kernel "
        "launches: a few ms per step for an SD-sized denoiser).",
    )
    queue_depth: int = Field(
        1024, gt=0, description="Steps queued ahead of the device before a launch blocks."
    )


class ModelSpec(PretrainedSection):
    """The text-to-image model every worker loads."""

    source: str = Field("", description="Hub id, local directory, or fsspec URL of a directory.")
    kind: Literal[KIND_NAMES] = Field(  # the kinds of workers/generators/registry.py
        "diffusers",
        description="; ".join(f"{info.name}: {info.description}" for info in KINDS.values()),
    )
    device: Annotated[Literal["auto", "cuda", "cpu"], NOT_FINGERPRINTED] = Field(
        "auto", description="auto: one GPU per worker where the cluster has GPUs, else CPU."
    )
    quantization: Quantization = Field(
        "none",
        description="torchao weight quantisation of the denoiser's linear layers; fp8 needs a GPU of "
        "compute capability 8.9 or newer.",
    )
    lora: list[LoraSpec] = Field(
        default_factory=list, description="LoRA adapters, all active together; URLs use storage_options."
    )
    scheduler: SchedulerSpec | None = Field(
        None, description="The diffusers scheduler (sampler) to use; default: the pipeline's own."
    )
    emulation: EmulationSpec | None = Field(
        None, description="kind: emulated only: the emulated device, e.g. {images_per_second: 30}."
    )
    # Fingerprinted: `context` cuts the denoiser's token rows over processes, which moves a pixel by a
    # level as a batch size does (docs/ARCHITECTURE.md, Determinism), and batch_size is fingerprinted.
    parallel: Parallel = Field(
        "none",
        description="How a replica's GPUs share the model (docs/big-and-small-models.md). components: "
        "text encoders, denoiser and VAE spread over its GPUs (diffusers' device_map balanced); context: "
        "every GPU runs the denoiser on its slice of the tokens (Ulysses attention, one process per GPU; "
        "FLUX and the other diffusers models with a context-parallel plan).",
    )
    # Not fingerprinted: offloading moves weights between host and GPU, the same kernels run on the same
    # numbers, so the images are byte-identical with or without it (tests/test_model_layout.py).
    offload: Annotated[Offload, NOT_FINGERPRINTED] = Field(
        "none",
        description="For a GPU too small for the model: model: each component moved onto the GPU while "
        "it runs; group: the denoiser's blocks streamed onto it ahead of use; sequential: each layer "
        "moved on as it runs (least memory, slowest). Does nothing on CPU workers.",
    )

    @model_validator(mode="after")
    def _emulation_goes_with_its_kind(self) -> ModelSpec:
        if (self.kind == "emulated") != (self.emulation is not None):
            raise ValueError(
                "model.emulation is set without model.kind: emulated; remove it"
                if self.emulation is not None
                else "model.kind: emulated needs model.emulation, e.g. {images_per_second: 30}"
            )
        return self

    @model_validator(mode="after")
    def _layout_is_one_choice(self) -> ModelSpec:
        """Offloading and spreading over GPUs are answers to the same shortage: one or the other; both
        are diffusers' (the other kinds load on one device; noop and emulated run a gang's protocol)."""
        if self.offload != "none" and self.kind != "diffusers":
            raise ValueError(f"model.offload is for model.kind: diffusers, not {self.kind}; remove it")
        if self.parallel != "none" and not KINDS[self.kind].spans_gpus:
            raise ValueError(f"model.parallel is for model.kind: diffusers, not {self.kind}; remove it")
        if self.parallel != "none" and self.offload != "none":
            raise ValueError(
                f"model.offload: {self.offload} with model.parallel: {self.parallel}: offload is for one "
                "GPU too small for the model, parallel for several GPUs; set one of them to none"
            )
        return self


class ScoringSpec(PretrainedSection):
    """A CLIP score (image-text) per image, computed on the actor after generation."""

    weights_file = ("config.json", "a transformers CLIPModel")

    source: str = Field(
        description="A transformers CLIPModel directory (tokenizer and image processor config beside it), "
        "hub id or URL, found as model.source is."
    )
    threshold: float | None = Field(
        None, description="Images scoring below it get status `filtered`; null: score only."
    )
    on_low_score: Literal["keep", "drop"] = Field(
        "keep", description="keep: the filtered row's image is written; drop: only its metadata row is."
    )


class SafetyRetrySpec(_Section):
    """`safety.policy: retry`: how many new seeds a flagged image gets, and what happens after."""

    attempts: int = Field(2, gt=0, le=16, description="New draws (seeds) tried after the first is flagged.")
    then: Literal["drop", "blur", "keep"] = Field(
        "drop", description="What happens to a row still flagged after its last attempt."
    )


class SafetySpec(PretrainedSection):
    """A safety classifier run on each image on the actor, before the copy back (workers/stages/safety.py)."""

    weights_file = ("config.json", "a StableDiffusionSafetyChecker")

    source: str = Field(
        description="A diffusers StableDiffusionSafetyChecker directory (config.json, safetensors weights, "
        "preprocessor_config.json), hub id or URL, found as model.source is."
    )
    policy: Literal["keep", "blur", "drop", "retry"] = Field(
        "blur",
        description="A flagged image is written and marked (keep), written blurred (blur), not written "
        "(drop), or drawn again with a new seed (retry).",
    )
    retry: SafetyRetrySpec = Field(
        default_factory=SafetyRetrySpec, description="policy: retry only: new seeds tried, and then what."
    )

    @property
    def draws(self) -> int:
        """Rounds of drawing a row may get: 1, or 1 + retry.attempts with policy retry."""
        return 1 + self.retry.attempts if self.policy == "retry" else 1

    @property
    def final_policy(self) -> str:
        """What happens to an image flagged on its row's last round: keep, blur or drop."""
        return self.retry.then if self.policy == "retry" else self.policy


class UpscaleSpec(PretrainedSection):
    """Super-resolution after safety, before the encoder (workers/stages/upscale.py): a single-image SR
    network loaded through spandrel, run on the device in tiles, or a diffusers upscaler pipeline
    guided by each row's prompt."""

    # what `source` holds, by kind (the driver checks it before any actor starts)
    MARKERS: ClassVar[dict[str, tuple[str, str]]] = {
        "spandrel": ("model.safetensors", "a super-resolution network"),
        "diffusers": ("model_index.json", "a diffusers upscaler pipeline"),
    }

    kind: Literal["spandrel", "diffusers"] = Field(
        "spandrel",
        description="spandrel: `source` holds an SR network as model.safetensors; diffusers: `source` is a "
        "StableDiffusionUpscalePipeline (x4, e.g. stabilityai/stable-diffusion-x4-upscaler) or a "
        "StableDiffusionLatentUpscalePipeline (x2) directory, run with the row's prompt and seed.",
    )
    source: str = Field(
        description="A directory (local, fsspec URL or hub id): kind spandrel, the network as "
        "model.safetensors, an architecture spandrel recognises (Real-ESRGAN, Compact, SPAN, SwinIR, HAT, "
        "...); kind diffusers, the pipeline as save_pretrained wrote it (safetensors weights)."
    )
    tile: int | None = Field(
        512,
        ge=16,
        description="spandrel: images with a side longer than this are upscaled in tiles of this many input "
        "pixels (memory); diffusers: the largest side it upscales (whole: a larger image is a "
        "model_rejected row). null: whole, any size.",
    )
    tile_overlap: int = Field(
        16,
        ge=0,
        description="Input pixels of context each tile reads beyond its edges, cut from its output: at "
        "least the network's receptive field makes tiles seamless.",
    )
    num_inference_steps: int = Field(20, gt=0, description="kind diffusers: denoising steps per image.")
    guidance_scale: float = Field(
        0.0,
        ge=0,
        description="kind diffusers: classifier-free guidance by the row's prompt; 1 or less: none (one "
        "UNet pass per step instead of two).",
    )
    noise_level: int = Field(
        20,
        ge=0,
        le=350,
        description="kind diffusers, the x4 pipeline: noise added to the low-resolution image before it "
        "is upscaled (0-350); more lets the model invent more detail.",
    )

    @property
    def weights_file(self) -> tuple[str, str]:  # type: ignore[override]
        return self.MARKERS[self.kind]

    @model_validator(mode="after")
    def _overlap_inside_a_tile(self) -> UpscaleSpec:
        if self.kind == "spandrel" and self.tile is not None and self.tile_overlap >= self.tile:
            raise ValueError(f"tile_overlap {self.tile_overlap} must be less than tile {self.tile}")
        return self

    @model_validator(mode="after")
    def _settings_of_the_kind(self) -> UpscaleSpec:
        """A setting the kind would ignore is refused, not silently dropped."""
        ignored = {
            "spandrel": ("num_inference_steps", "guidance_scale", "noise_level"),
            "diffusers": ("tile_overlap",),
        }[self.kind]
        given = sorted(set(ignored) & self.model_fields_set)
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to kind: {self.kind}")
        return self


class EvaluationSpec(PretrainedSection):
    """Dataset evaluation (workers/stages/evaluation.py, imagemill.evaluation.post_pass): every written
    image is embedded by a feature model on the actor; the driver merges the shards' feature statistics into
    FID/KID against a reference, diversity and near-duplicates."""

    weights_file = ("config.json", "a transformers CLIPModel")  # features: clip (inception: a file)

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
    reference: str | None = Field(
        None,
        description="Real images to compare with: a folder of image files, a Parquet file or folder with an "
        "`image` column, or precomputed statistics in clean-fid's .npz layout (mu, sigma; no KID then).",
    )
    reference_storage_options: StorageOptions
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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="inductor's mode: reduce-overhead replays the denoiser's step as a CUDA graph (one "
        "launch per step, not hundreds: the host's launch work no longer paces a fast GPU); CPU runs "
        "it as default.",
    )
    tiny_vae: str | None = Field(
        None, description="AutoencoderTiny (TAESD) hub id, local dir or URL that replaces the VAE decoder."
    )
    cache: CacheSpec | None = Field(None, description="Step caching of the denoiser (FLUX transformers).")
    compile_cache: Annotated[str | None, NOT_FINGERPRINTED] = Field(
        None,
        description="Folder or URL where compiled denoisers are kept, per model, torch, device and shape; "
        "later actors load them instead of compiling.",
    )
    compile_cache_storage_options: StorageOptions

    @model_validator(mode="after")
    def _compile_cache_needs_compile(self) -> SpeedSpec:
        if self.compile_cache and not self.compile:
            raise ValueError("compile_cache keeps compiled code: it needs compile: true")
        if self.compile_mode != "default" and not (self.compile and self.compile_backend == "inductor"):
            raise ValueError(
                f"compile_mode {self.compile_mode} is inductor's: it needs compile: true and "
                "compile_backend: inductor"
            )
        return self


class GenerationSpec(_Section):
    """Job-wide defaults; the input columns of the same names override them per row."""

    width: int = Field(512, description="Image width in pixels: a multiple of 8 in 8..4096.")
    height: int = Field(512, description="Image height in pixels: a multiple of 8 in 8..4096.")
    num_inference_steps: int = Field(30, description="Denoising steps, 1..1000.")
    guidance_scale: float = Field(
        7.5, description="Classifier-free guidance, 0..100 (0: none, as turbo models use)."
    )
    negative_prompt: str | None = Field(None, description="What images should not show; none by default.")
    seed: int = Field(
        0, description="Job seed: a row without a seed column gets one derived from (seed, id)."
    )
    images_per_prompt: int = Field(
        1,
        gt=0,
        le=1000,
        description="Images per input row: image k of row <id> is <id>_<k>, its seed the row's seed + k.",
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
    resize: Literal["center_crop", "pad", "stretch", "keep"] = Field(
        "center_crop",
        description="Image-to-image: how a source is brought to the row's width and height. `keep` "
        "(model.kind: none only): each source stays at its own size, which becomes its row's.",
    )
    mask_grow: int = Field(
        0, ge=0, le=MAX_MASK_RADIUS, description="Inpainting: pixels the mask is widened by (a margin)."
    )
    mask_blur: int = Field(
        0,
        ge=0,
        le=MAX_MASK_RADIUS,
        description="Inpainting: the Gaussian blur (sigma, pixels) of the grown mask's edge, over which "
        "the drawn image fades into the source.",
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


MIN_GPU_SHARE = 0.0001  # Ray's unit of a resource


class WorkersSpec(_Section):
    """The Ray actors that generate; only the batch size decides output bytes, so a resume may change
    the rest (budgets included: raise one to go on)."""

    num_workers: Annotated[int | None, NOT_FINGERPRINTED] = Field(
        None, gt=0, description="Actors to start; default: one per GPU, or one per CPU without GPUs."
    )
    # "auto": the largest power of two that fits the device, found by the first actor to load and
    # recorded in the job's fingerprint (imagemill.workers.batch_fit, imagemill.planning.auto_batch).
    batch_size: CountOrAuto = Field(
        8, description="Images per model call, or auto: the largest power of two up to 64 that fits the GPU."
    )
    num_cpus_per_worker: Annotated[float, NOT_FINGERPRINTED] = Field(
        1, gt=0, description="CPUs Ray reserves for each actor."
    )
    # How replicas are placed from it: imagemill.planning.placement (ReplicaPlan).
    gpus_per_worker: Annotated[float, NOT_FINGERPRINTED] = Field(
        1,
        gt=0,
        description="GPUs per model replica: 1/n (0.5, 0.25) puts n actors on a GPU; 2, 4, 8 span that "
        "many GPUs of one node (model.parallel: context: a gang, one actor per GPU; components: one actor).",
    )
    max_shard_attempts: Annotated[int, NOT_FINGERPRINTED] = Field(
        3, gt=0, description="Tries a shard gets before the run reports it failed."
    )
    # Budgets over all runs of the output, failed attempts too (imagemill.execution.budget): no new shard
    # once reached.
    max_gpu_hours: Annotated[float | None, NOT_FINGERPRINTED] = Field(
        None,
        gt=0,
        description="A budget in device-hours (GPU-, or CPU-hours on CPU) over all runs of the output.",
    )
    max_cost_usd: Annotated[float | None, NOT_FINGERPRINTED] = Field(
        None, gt=0, description="A budget in USD over all runs of the output, priced by cost.gpu_hour_usd."
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus_or_a_share_of_one(cls, value: float) -> float:
        """Ray packs fractional actors onto one GPU only when the fractions add up to exactly 1 (in its
        unit of 0.0001 GPU), and a replica spans whole GPUs: 1/n or a whole number."""
        share = MIN_GPU_SHARE <= value < 1 and math.isclose(round(1 / value) * value, 1.0)
        if not (share or (math.isfinite(value) and value >= 1 and value.is_integer())):
            raise ValueError(
                f"must be 1/n (0.5, 0.25, ... down to 0.0001) or a whole number of GPUs, not {value:g}"
            )
        return 1 / round(1 / value) if share else value


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


class ExpansionSpec(PretrainedSection):
    """Prompt expansion: a causal language model rewrites each prompt before it is drawn."""

    weights_file = ("config.json", "a transformers causal LM")

    source: str = Field(description="Hub id, local directory, or fsspec URL of a transformers causal LM.")
    template: str = Field(
        "Describe a photo of {prompt} in one detailed sentence:",
        description="The text the language model continues; {prompt} is replaced by the input prompt.",
    )
    max_new_tokens: int = Field(48, gt=0, le=4096, description="Most tokens added to a prompt.")
    do_sample: bool = Field(False, description="false: greedy; true: sampled, seeded per variant id.")
    temperature: float = Field(1.0, gt=0, description="do_sample only: the sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="do_sample only: nucleus sampling's probability mass.")
    n_variants: int = Field(
        1, gt=0, le=1000, description="Expansions per input row, each its own row with id <id>_v<k>."
    )
    batch_size: int = Field(16, gt=0, description="Prompts per language-model call.")
    placement: Annotated[Literal["actor", "pool"], NOT_FINGERPRINTED] = Field(
        "actor", description="actor: in each ShardWorker, on its device; pool: expander actors of its own."
    )
    num_workers: Annotated[int, NOT_FINGERPRINTED] = Field(1, gt=0, description="pool only: expander actors.")
    num_gpus: Annotated[float, NOT_FINGERPRINTED] = Field(
        0, ge=0, description="pool only: GPUs per expander (0: it runs on CPU)."
    )
    num_cpus: Annotated[float, NOT_FINGERPRINTED] = Field(
        1, gt=0, description="pool only: CPUs per expander."
    )

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


class StageSections(_Section):
    """The sections of the actor's post-generation stages (core/stage_table.py), each declared here,
    below its class: a new stage's spec section is its class in this module and its field here
    (JobSpec takes these after its other sections)."""

    scoring: ScoringSpec | None = Field(None, description="Optional CLIP score per image.")
    safety: SafetySpec | None = Field(None, description="Optional safety classifier and its policy.")
    upscale: UpscaleSpec | None = Field(
        None, description="Optional super-resolution of each image, after safety (docs/upscale.md)."
    )
    evaluation: EvaluationSpec | None = Field(
        None, description="Optional dataset evaluation: features, FID/KID, diversity, near-duplicates."
    )
