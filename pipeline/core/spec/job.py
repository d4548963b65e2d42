"""The job spec as a whole: its sections in the order the reference page lists them, and the rules
that tie one section to another."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from imagemill.core.errors import shown
from imagemill.core.kinds import KINDS
from imagemill.core.spec.fingerprint import fingerprint
from imagemill.core.spec.markers import NOT_FINGERPRINTED, REDACTED, dumped
from imagemill.core.spec.rules import denoising_problem, watermark_size_problem
from imagemill.core.spec.sections import (
    CostSpec,
    ExpansionSpec,
    GenerationSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    PretrainedSection,
    SpeedSpec,
    StageSections,
    WorkersSpec,
    _Section,
)


class _JobSections(_Section):
    """The sections every job has or may have, but the post-generation stages' (StageSections)."""

    name: Annotated[str, NOT_FINGERPRINTED] = Field(
        "imagemill", description="The job's name in its record and logs; {date} becomes the day (UTC)."
    )
    input: InputSpec = Field(description="The prompts.")
    output: OutputSpec = Field(description="Where images and metadata are written.")
    model: ModelSpec = Field(description="The text-to-image model.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="Job defaults; input columns of the same names override them per row.",
    )
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="The actors that generate.")
    cost: Annotated[CostSpec, NOT_FINGERPRINTED] = Field(
        default_factory=CostSpec, description="Prices of device time, for reports and max_cost_usd."
    )
    expansion: ExpansionSpec | None = Field(
        None, description="Optional prompt expansion by a language model."
    )
    speed: SpeedSpec = Field(
        default_factory=SpeedSpec,
        description="How a diffusers model runs; each option may change output bytes slightly.",
    )


class JobSpec(StageSections, _JobSections):
    """One YAML file: the whole contract of a job, read by the driver, the actors and the job record.
    Its sections are _JobSections' and then StageSections' (pydantic takes the later base's first)."""

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
    def _several_gpus_say_how(self) -> JobSpec:
        """A replica of several GPUs with the whole model on one of them would leave the rest idle."""
        if self.workers.gpus_per_worker > 1 and self.model.parallel == "none":
            raise ValueError(
                f"workers.gpus_per_worker: {self.workers.gpus_per_worker:g} needs model.parallel: components "
                "(the model's parts over the GPUs) or context (one process per GPU); or set it to 1"
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
    def _image_column_fits_the_kind(self) -> JobSpec:
        """Image-to-image drives a diffusers image-to-image pipeline, and kind `none` draws nothing but
        the sources; other kinds would ignore them. Only `none` may go without prompts."""
        sources = KINDS[self.model.kind].sources
        if self.input.format == "images" and sources != "required":
            raise ValueError(
                f"input.format: images has no prompts, so it takes model.kind: none (enhance-only), not "
                f"{self.model.kind}; for image-to-image, list the images with their prompts in a Parquet file"
            )
        if self.input.prompt_column is None:
            if sources != "required":
                raise ValueError(
                    f"input.prompt_column: null (no prompts) needs model.kind: none, not {self.model.kind}"
                )
            reading = [name for name in ("scoring", "expansion") if getattr(self, name) is not None]
            if reading:
                raise ValueError(f"{', '.join(reading)} read each row's prompt: set input.prompt_column")
        if self.input.image_column is None:
            if sources == "required":
                raise ValueError(
                    f"model.kind: {self.model.kind} draws each row's source image: set input.image_column"
                )
            return self
        if sources == "refused":
            taking = ", ".join(name for name, info in KINDS.items() if info.sources != "refused")
            raise ValueError(f"input.image_column needs model.kind: {taking}, not {self.model.kind}")
        if sources == "required":
            return self  # nothing is denoised: strength does not apply
        strength = self.generation.strength
        problem = denoising_problem(
            self.generation.num_inference_steps, strength[0] if isinstance(strength, list) else strength
        )
        if problem:
            raise ValueError(f"generation: {problem}")
        return self

    @model_validator(mode="after")
    def _kept_sizes_draw_nothing(self) -> JobSpec:
        """`resize: keep` gives each row its source's size, any size; a model draws one size per batch,
        and its sizes must divide by the VAE factor, so only a kind that draws nothing takes it."""
        if self.generation.resize == "keep" and KINDS[self.model.kind].sources != "required":
            raise ValueError(
                f"generation.resize: keep (each source at its own size) needs model.kind: none, not "
                f"{self.model.kind}: a model draws one size per batch, a multiple of 8; use center_crop, "
                "pad or stretch"
            )
        return self

    @model_validator(mode="after")
    def _scale_column_needs_an_upscaler(self) -> JobSpec:
        if self.input.scale_column is not None and self.upscale is None:
            raise ValueError("input.scale_column is each row's upscale scale: it needs an upscale: section")
        return self

    @model_validator(mode="after")
    def _reference_column_needs_an_upscaler(self) -> JobSpec:
        if self.input.reference_column is not None and self.upscale is None:
            raise ValueError(
                "input.reference_column is what each upscaled image is measured against: it needs an "
                "upscale: section (or remove input.reference_column)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if not value.isprintable():  # it heads `status` and log lines: one line each
            raise ValueError(f"must be one line of printable characters, not '{shown(value, 40)}'")
        return value

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide what the job's output holds (imagemill.core.spec.fingerprint)."""
        return fingerprint(self)

    def shard_input(self) -> InputSpec:
        """The input as a shard's file is read: with input.format: images that file is a listing in
        the output (imagemill.planning.image_listing), so it is read with the output's storage
        options; the images it lists are still read with the input's."""
        if self.input.format != "images":
            return self.input
        return self.input.model_copy(update={"storage_options": self.output.storage_options})

    def with_batch_size(self, batch_size: int) -> JobSpec:
        """This spec with `workers.batch_size` resolved (from `auto`) to a number."""
        return self.model_copy(update={"workers": self.workers.model_copy(update={"batch_size": batch_size})})

    def with_rows_per_shard(self, rows_per_shard: int) -> JobSpec:
        """This spec with `input.rows_per_shard` resolved (from `auto`) to the number it was cut by."""
        return self.model_copy(
            update={"input": self.input.model_copy(update={"rows_per_shard": rows_per_shard})}
        )

    def label_column(self) -> str | None:
        """The column per-label features read labels from: the one place that decides it."""
        return self.input.label()

    def pretrained(self) -> dict[str, PretrainedSection]:
        """The sections that name pretrained weights, by section name (those the job has)."""
        sections = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: value for name, value in sections.items() if isinstance(value, PretrainedSection)}

    @property
    def images_per_row(self) -> int:
        """Metadata rows (images) per input row: variants × images per prompt."""
        variants = self.expansion.n_variants if self.expansion else 1
        return variants * self.generation.images_per_prompt

    def redacted(self) -> dict[str, Any]:
        """The spec as a dict with every redacted field (storage options, the signing key's place)
        hidden: safe for logs and the job record."""
        return dumped(self, hide=REDACTED)
