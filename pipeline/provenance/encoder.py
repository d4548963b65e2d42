"""Everything that goes into an image file, in order: watermark (pixels) → encode with parameters →
read the watermark back → C2PA signature (bytes). The worker hashes and writes what comes out, so the
metadata's `sha256` is the hash of the bytes written. Runs on the writer threads; its time is the
shard's `image_encode`. What the parameters and the manifest say is the row's published form
(publication.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imagemill.core.images import encode_image
from imagemill.core.records import MetadataRow
from imagemill.core.spec import IMAGE_EXTENSIONS, JobSpec, OutputSpec
from imagemill.provenance.c2pa_signing import C2paSigner
from imagemill.provenance.parameters import jpeg_with_metadata
from imagemill.provenance.publication import Publication
from imagemill.provenance.watermark import RETRY_HEADROOM, add_watermark, reads_back


@dataclass(frozen=True)
class Encoded:
    """A row's file bytes, and whether its watermark read back from them (None: no watermark)."""

    data: bytes
    watermark_ok: bool | None = None


@dataclass
class ImageEncoder:
    """One per actor: turns a row's uint8 pixels into the bytes of its file."""

    output: OutputSpec
    publication: Publication  # also the writers' (workers/writers.py): the model is hashed once
    signer: C2paSigner | None

    @classmethod
    def for_job(cls, spec: JobSpec, generator: Any) -> ImageEncoder:
        out = spec.output
        return cls(
            out,
            Publication.for_job(spec, generator),
            C2paSigner(out.c2pa) if out.c2pa is not None else None,
        )

    def encode(self, pixels: np.ndarray | bytes, row: MetadataRow) -> Encoded:
        """`pixels`: uint8 (H, W, 3), or JPEG bytes encoded on the GPU (device_jpeg.py, which runs only
        without a watermark), to which the parameters are added as they are."""
        out = self.output
        options = self.publication.embedded(row, out.image_format)
        watermark_ok = None
        if isinstance(pixels, bytes):
            data = jpeg_with_metadata(pixels, options.get("exif"), options.get("xmp"))
        elif out.watermark is None:
            data = encode_image(pixels, out.image_format, out.quality, **options)
        else:
            data, watermark_ok = self._watermarked(pixels, options)
        if self.signer is not None:  # a manifest changes no pixel: the watermark reads back as before
            title = f"{row.id}.{IMAGE_EXTENSIONS[out.image_format]}"
            data = self.signer.sign(data, out.image_format, title, self.publication.signed(row))
        return Encoded(data, watermark_ok)

    def _watermarked(self, pixels: np.ndarray, options: dict[str, Any]) -> tuple[bytes, bool | None]:
        """The file with the watermark embedded, and whether it reads back from the encoded bytes (after
        JPEG or WebP compression, as a reader sees them; None: `on_unreadable: keep`, not read back);
        `on_unreadable: retry` embeds it once more with headroom (provenance.watermark) where it does
        not, and keeps that file."""
        out = self.output
        assert out.watermark is not None
        if out.watermark.on_unreadable == "keep":
            marked = add_watermark(pixels, out.watermark.payload, out.watermark.method)
            return encode_image(marked, out.image_format, out.quality, **options), None
        headrooms = (0, RETRY_HEADROOM) if out.watermark.on_unreadable == "retry" else (0,)
        for headroom in headrooms:
            marked = add_watermark(pixels, out.watermark.payload, out.watermark.method, headroom)
            data = encode_image(marked, out.image_format, out.quality, **options)
            if reads_back(data, out.watermark.payload, out.watermark.method):
                return data, True
        return data, False
