"""The model kinds imagemill runs: `model.kind` → its generator, its model directory's marker, its options.

This table is the one place a kind is declared. The job spec takes its `model.kind` values from it,
the driver's model check takes the marker file from it, and the actor's `make_generator` builds the
kind's generator class `from_spec`. Adding a kind is a generator module implementing
`contract.Generator` plus one `KindInfo` row here (and its test). Generator classes are named as
strings and imported on first use: the driver and the spec import this module, and must not pay for
(or need) torch, diffusers or transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagemill.core.errors import ImagemillError

if TYPE_CHECKING:
    from imagemill.workers.generators.contract import Generator


@dataclass(frozen=True)
class KindInfo:
    name: str
    generator: str  # "module:Class" implementing contract.Generator, imported when a worker builds it
    marker: str | None  # the file save_pretrained writes at the top of its model directory; None: no model
    description: str  # what its model directory is, for error messages ("point model.source at ...")
    diffusers_options: bool = False  # whether model.lora, model.quantization and speed apply to it
    # input.image_column: "refused" (the kind would ignore the sources), "optional" (image-to-image),
    # "required" (the source itself is the draw: enhance-only, no model, prompts optional)
    sources: str = "refused"
    # whether model.parallel applies: a model split over a replica's GPUs (diffusers), or a stand-in that
    # runs a gang's protocol without a model (noop, emulated: tests and benches of placement)
    spans_gpus: bool = False

    @property
    def needs_model(self) -> bool:
        """Whether a job of this kind loads a model (and so needs model.source)."""
        return self.marker is not None

    def generator_class(self) -> type[Generator]:
        module, _, name = self.generator.partition(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[str, KindInfo] = {
    info.name: info
    for info in (
        KindInfo(
            "diffusers",
            "imagemill.workers.generators.diffusion.generator:DiffusersGenerator",
            "model_index.json",
            "a diffusers pipeline",
            diffusers_options=True,
            sources="optional",
            spans_gpus=True,
        ),
        KindInfo(
            "janus",
            "imagemill.workers.generators.janus:JanusGenerator",
            "config.json",
            "a transformers Janus model",
        ),
        KindInfo(
            "noop",
            "imagemill.workers.generators.noop:NoopGenerator",
            None,
            "no model: solid colours from the seeds (measures the pipeline)",
            spans_gpus=True,
        ),
        KindInfo(
            "emulated",
            "imagemill.workers.generators.emulated:EmulatedGenerator",
            None,
            "no model: a GPU emulated on the CPU (model.emulation), textured images (measures device busy)",
            spans_gpus=True,
        ),
        KindInfo(
            "none",
            "imagemill.workers.generators.none:SourceAsDraw",
            None,
            "no model: each row's source image (input.image_column) is its draw, for the stages after "
            "generation (enhance-only: safety, upscale, watermark, encode)",
            sources="required",
        ),
    )
}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)


def kind_info(name: str) -> KindInfo:
    """The registry row of `name`, or a one-line error listing the kinds there are."""
    try:
        return KINDS[name]
    except KeyError:
        raise ImagemillError(
            f"model.kind '{name}' is not a model kind imagemill runs; use one of: {', '.join(KIND_NAMES)}"
        ) from None
