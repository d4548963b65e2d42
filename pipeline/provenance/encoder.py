"""Everything that goes into an image file, in order: watermark (pixels) → encode with parameters →
C2PA signature (bytes). The worker hashes and writes what comes out, so the metadata's `sha256` is the
hash of the bytes written. Runs on the writer threads; its time is the shard's `image_encode`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from imagemill.core.images import encode_image
from imagemill.core.kinds import KINDS
from imagemill.core.records import MetadataRow
from imagemill.core.spec import IMAGE_EXTENSIONS, JobSpec, OutputSpec
from imagemill.provenance.c2pa_signing import C2paSigner
from imagemill.provenance.model_hash import model_hash
from imagemill.provenance.parameters import (
    ModelFacts,
    jpeg_with_metadata,
    metadata_json,
    save_options,
)
from imagemill.provenance.watermark import RETRY_HEADROOM, add_watermark, reads_back


def model_facts(spec: JobSpec, generator: Any) -> ModelFacts:
    """What the files say about the model and the job's provenance settings; the model's hash is read
    here, once per actor."""
    provenance: dict[str, Any] = {}
    if spec.output.watermark is not None:
        provenance["watermark"] = spec.output.watermark.model_dump()
    if spec.output.c2pa is not None:
        provenance["c2pa"] = True
    has_files = KINDS[spec.model.kind].needs_model
    return ModelFacts(
        # the generator's own copy of the files: a URL is resolved (listed, fetched) once per actor
        model_hash=model_hash(generator.model_source.local) if has_files else None,
        scheduler=getattr(
            generator, "scheduler_name", None
        ),  # diffusers: the sampler as the metadata names it
        loras=[lora.model_dump() for lora in spec.model.lora],
        software=f"imagemill {metadata.version('imagemill')}",
        provenance=provenance,
    )


@dataclass(frozen=True)
class Encoded:
    """A row's file bytes, and whether its watermark read back from them (None: no watermark)."""

    data: bytes
    watermark_ok: bool | None = None


@dataclass
class ImageEncoder:
    """One per actor: turns a row's uint8 pixels into the bytes of its file."""

    output: OutputSpec
    facts: ModelFacts | None  # None when neither parameters nor C2PA need them
    signer: C2paSigner | None

    @classmethod
    def for_job(cls, spec: JobSpec, generator: Any) -> ImageEncoder:
        out = spec.output
        needs_facts = out.embed_parameters or out.c2pa is not None
        return cls(
            out,
            model_facts(spec, generator) if needs_facts else None,
            C2paSigner(out.c2pa) if out.c2pa is not None else None,
        )

    def encode(self, pixels: np.ndarray | bytes, row: MetadataRow) -> Encoded:
        """`pixels`: uint8 (H, W, 3), or JPEG bytes encoded on the GPU (device_jpeg.py, which runs only
        without a watermark), to which the parameters are added as they are."""
        out = self.output
        options = save_options(row, self.facts, out.image_format) if out.embed_parameters else {}
        watermark_ok = None
        if isinstance(pixels, bytes):
            data = jpeg_with_metadata(pixels, options.get("exif"), options.get("xmp"))
        elif out.watermark is None:
            data = encode_image(pixels, out.image_format, out.quality, **options)
        else:
            data, watermark_ok = self._watermarked(pixels, options)
        if self.signer is not None:  # a manifest changes no pixel: the watermark reads back as before
            title = f"{row.id}.{IMAGE_EXTENSIONS[out.image_format]}"
            data = self.signer.sign(data, out.image_format, title, metadata_json(row, self.facts))
        return Encoded(data, watermark_ok)

    def _watermarked(self, pixels: np.ndarray, options: dict[str, Any]) -> tuple[bytes, bool]:
        """The file with the watermark embedded, and whether it reads back from the encoded bytes (after
        JPEG or WebP compression, as a reader sees them); `on_unreadable: retry` embeds it once more
        with headroom (provenance.watermark) where it does not, and keeps that file."""
        out = self.output
        assert out.watermark is not None
        headrooms = (0, RETRY_HEADROOM) if out.watermark.on_unreadable == "retry" else (0,)
        for headroom in headrooms:
            marked = add_watermark(pixels, out.watermark.payload, out.watermark.method, headroom)
            data = encode_image(marked, out.image_format, out.quality, **options)
            if reads_back(data, out.watermark.payload, out.watermark.method):
                return data, True
        return data, False
