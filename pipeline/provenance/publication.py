"""What a published file may say about a row: the one rule every writer of published bytes follows.

Published: what a job hands to others, so everything in it is read by people who did not run it:
each image file's embedded parameters (PNG iTXt, EXIF, XMP) and its C2PA manifest, the WebDataset
`<key>.json` members, the `parquet` format's `data/` columns. Private: the job's own record, which keeps
every value (the metadata Parquet, `shards/*.json`, `_job.json`).

`output.embed_parameters` says which form published files get:

- `public` (the default): a row's locations are left out, because a bucket name or a local directory
  says whose data it is and where it lives. The input file and an image-to-image source path are
  named by their file name only (the folders and the bucket dropped, and a URL's query, which may hold
  a signed token); the model by its hub id where it has one (a hub id names public weights), else by
  its content hash (`sha256:<hex>`, model_hash.py), never by its directory's name; a LoRA by its hub
  id, else by its weights file's name only.
- `full`: every value as the metadata Parquet has it, for files that stay in-house.
- `none`: image files carry no parameters, no AI label and no parameters assertion in a C2PA manifest;
  WebDataset JSON and `data/` columns, the dataset's own fields, are written as under `public`.

Only this module decides; the encoder (provenance/encoder.py) and the writers (workers/writers.py) ask
it, so no published file can take another rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

from imagemill.core.kinds import KINDS
from imagemill.core.model_source import public_name
from imagemill.core.records import MetadataRow
from imagemill.core.spec import JobSpec
from imagemill.core.spec.sections import EmbedParameters
from imagemill.provenance.model_hash import model_hash
from imagemill.provenance.parameters import MODEL_HASH_PREFIX, ModelFacts, metadata_json, save_options


def file_name(location: str | None) -> str | None:
    """The last part of a path or URL: no folder, no bucket, no query or fragment. Nothing is
    stripped or normalised first (urllib drops a newline; `rstrip("/")` would): a name that is empty
    or odd stays so, rather than a folder taking its place."""
    if not location:
        return location
    path = re.split("[?#]", location, maxsplit=1)[0] if "://" in location else location
    return path.rsplit("/", 1)[-1]


def model_facts(spec: JobSpec, generator: Any) -> ModelFacts:
    """What the files say about the model and the job's provenance settings, as the job has them; the
    model's hash is read here, once per actor."""
    provenance: dict[str, Any] = {}
    if spec.output.watermark is not None:
        provenance["watermark"] = spec.output.watermark.model_dump()
    if spec.output.c2pa is not None:
        provenance["c2pa"] = True
    # read only where a file will name the model by it: not for bare image files (`none`, `files`)
    named = spec.output.embed_parameters != "none" or spec.output.format != "files"
    hashed = KINDS[spec.model.kind].needs_model and named
    return ModelFacts(
        # the generator's own copy of the files: a URL is resolved (listed, fetched) once per actor
        model_hash=model_hash(generator.model_source.local) if hashed else None,
        scheduler=generator.scheduler_name,  # diffusers: as the metadata names it
        sampler=generator.a1111_sampler,  # diffusers: A1111's name, where it has one
        loras=[lora.model_dump() for lora in spec.model.lora],
        software=f"imagemill {metadata.version('imagemill')}",
        provenance=provenance,
    )


def _public_lora(lora: dict[str, Any]) -> dict[str, Any]:
    return {**lora, "source": public_name(lora["source"]), "weight_name": file_name(lora["weight_name"])}


@dataclass(frozen=True)
class Publication:
    """The published form of an actor's rows: one per actor, from the spec and the loaded model."""

    level: EmbedParameters
    facts: ModelFacts  # as published files give them (a LoRA's location left out unless `full`)
    model: str  # the model as published records name it

    @classmethod
    def for_job(cls, spec: JobSpec, generator: Any) -> Publication:
        return cls.of(spec.output.embed_parameters, spec.model.source, model_facts(spec, generator))

    @classmethod
    def of(cls, level: EmbedParameters, source: str, facts: ModelFacts) -> Publication:
        """`source`: `model.source` as the spec gives it; `facts`: as model_facts found them."""
        if level == "full":
            return cls(level, facts, source)
        hashed = f"{MODEL_HASH_PREFIX}{facts.model_hash}" if facts.model_hash else ""
        public = replace(facts, loras=[_public_lora(lora) for lora in facts.loras])
        return cls(level, public, public_name(source) or hashed)

    def record(self, row: MetadataRow) -> MetadataRow:
        """`row` as a published record may carry it (WebDataset JSON, `data/` columns, embedded JSON)."""
        if self.level == "full":
            return row
        return replace(
            row,
            model=self.model,
            input_file=file_name(row.input_file),
            source_image=file_name(row.source_image),
            mask_image=file_name(row.mask_image),
        )

    def embedded(self, row: MetadataRow, image_format: str) -> dict[str, Any]:
        """Pillow `save` keyword arguments that embed the row's published parameters ({} for none)."""
        return {} if self.level == "none" else save_options(self.record(row), self.facts, image_format)

    def signed(self, row: MetadataRow) -> str | None:
        """The JSON of a C2PA manifest's parameters assertion; None for none (the manifest then says
        only that the image is AI-generated)."""
        return None if self.level == "none" else metadata_json(self.record(row), self.facts)
