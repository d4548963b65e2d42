"""The `image_encode` stage, on the writer threads: a kept row's host pixels (or nvJPEG bytes) and its
metadata row become the bytes of its file, through the job's provenance chain (watermark → encode with
parameters → C2PA signature: imagemill.provenance.encoder)."""

from __future__ import annotations

from typing import Self

import numpy as np

from imagemill.core.records import MetadataRow
from imagemill.core.spec import JobSpec
from imagemill.provenance.encoder import Encoded, ImageEncoder
from imagemill.workers.stages.contract import StageContext


class EncodeStage:
    section = None  # every written image is encoded; `output:` says how
    needs = ("pixels",)
    adds = ()
    changes_pixels = True  # a watermark is added to the pixels
    columns = ("sha256", "watermark_ok")

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls(ImageEncoder.for_job(spec, context.generator))

    def encode(self, pixels: np.ndarray | bytes, row: MetadataRow) -> Encoded:
        """On a writer thread: the file's bytes of one kept row, and whether its watermark reads back."""
        return self.encoder.encode(pixels, row)
