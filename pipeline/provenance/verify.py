"""`imagemill verify`: what a published image file says about itself, checked from the file alone.

For each image (a file, a folder searched for images, WebDataset tars and `parquet`-format data files,
local or any fsspec URL):

- parameters: the `imagemill` JSON the actors embed (PNG iTXt; JPEG/WebP EXIF ImageDescription);
- C2PA: the manifest, validated by c2pa-python's Reader (signature, certificate profile, the hash of
  the image's bytes); a manifest that does not validate, or none where the file's parameters say it
  was signed, fails the file;
- watermark: with `--watermark PAYLOAD`, or where the file's parameters name one, the payload is read
  back from the pixels; not found fails the file.

A file that does not decode fails too. One line per failed file, then a summary; the CLI exits 1 when
any file failed.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import payload_bits
from imagemill.core.storage import filesystem
from imagemill.provenance import optional_library
from imagemill.provenance.c2pa_signing import MIME_TYPES
from imagemill.provenance.parameters import IMAGE_DESCRIPTION
from imagemill.provenance.watermark import is_found, wrong_bits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg"}


@dataclass
class FileCheck:
    """What one image file says, and why it fails (empty `problems`: it verifies)."""

    name: str
    parameters: dict[str, Any] | None = None
    c2pa: str | None = None  # the Reader's validation state (Valid, Trusted, Invalid); None: no manifest
    watermark_wrong_bits: int | None = None  # None: not checked
    watermark_found: bool | None = None
    problems: list[str] = field(default_factory=list)


def image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


def embedded_parameters(image: Image.Image) -> dict[str, Any] | None:
    """The `imagemill` JSON embedded in an opened image, or None."""
    text = image.info.get("imagemill") or image.getexif().get(IMAGE_DESCRIPTION)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def c2pa_state(data: bytes, kind: str) -> tuple[str | None, list[str]]:
    """The manifest's validation state (None when there is none) and its failure codes."""
    c2pa = optional_library("c2pa", "imagemill verify")
    try:
        with c2pa.Reader(MIME_TYPES[kind], io.BytesIO(data)) as reader:
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__:
            return None, []
        return "Invalid", [f"manifest does not read ({type(exc).__name__.lstrip('_')})"]
    failures = (results.get("activeManifest") or {}).get("failure") or []
    return state, [failure.get("code", "?") for failure in failures]


def check_image(name: str, data: bytes, watermark: str | None = None, method: str = "dwtDctSvd") -> FileCheck:
    """Check one image's bytes; `watermark`: a payload to look for (else the one its parameters name)."""
    check = FileCheck(name)
    kind = image_format(data)
    if kind is not None:  # the manifest's hash of the bytes holds whether or not they still decode
        check.c2pa, failures = c2pa_state(data, kind)
        if check.c2pa == "Invalid":
            check.problems.append(f"C2PA manifest does not validate: {', '.join(failures) or 'invalid'}")
    try:
        image = Image.open(io.BytesIO(data))
        pixels = np.asarray(image.convert("RGB"))
    except Exception as exc:
        check.problems.append(f"does not decode as an image ({type(exc).__name__})")
        return check
    check.parameters = embedded_parameters(image)
    declared = check.parameters or {}
    if check.c2pa is None and declared.get("c2pa"):
        check.problems.append("no C2PA manifest, though its parameters say it was signed")
    if watermark is None and isinstance(declared.get("watermark"), dict):
        watermark, method = declared["watermark"].get("payload"), declared["watermark"].get("method", method)
    if watermark:
        check.watermark_wrong_bits = wrong_bits(pixels, watermark, method)
        check.watermark_found = is_found(check.watermark_wrong_bits, watermark)
        if check.watermark_wrong_bits is None:
            check.problems.append("too small to carry the watermark (under 256x256)")
        elif not check.watermark_found:
            check.problems.append(f"watermark not found ({check.watermark_wrong_bits} bits wrong)")
    return check


def _images(url: str, storage_options: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image at `url`: an image file, a tar's images, a data Parquet's `image`
    column, or all of these under a folder."""
    fs, root = filesystem(url, storage_options)
    paths = sorted(fs.find(root)) if fs.isdir(root) else [root]
    for path in paths:
        lower = path.lower()
        if lower.endswith(IMAGE_SUFFIXES):
            yield path, fs.cat_file(path)
        elif lower.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        yield f"{path}/{member.name}", tar.extractfile(member).read()
        elif lower.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(fs.cat_file(path)))
            if "image" in table.column_names:
                ids = table.column("id").to_pylist() if "id" in table.column_names else range(table.num_rows)
                for row_id, image in zip(ids, table.column("image").to_pylist(), strict=True):
                    yield f"{path}#{row_id}", image["bytes"]


@dataclass
class VerifyReport:
    checks: list[FileCheck]

    @property
    def failed(self) -> list[FileCheck]:
        return [check for check in self.checks if check.problems]

    def text(self) -> str:
        lines = [f"FAILED {check.name}: {'; '.join(check.problems)}" for check in self.failed]
        watermarked = [check for check in self.checks if check.watermark_found is not None]
        with_parameters = sum(check.parameters is not None for check in self.checks)
        signed = sum(check.c2pa in ("Valid", "Trusted") for check in self.checks)
        found = sum(bool(check.watermark_found) for check in watermarked)
        lines.append(
            f"{len(self.checks)} images: {with_parameters} with parameters, {signed} with a valid C2PA "
            f"manifest, watermark found in {found} of {len(watermarked)} checked; {len(self.failed)} failed"
        )
        return "\n".join(lines)


def verify(
    urls: list[str],
    storage_options: dict[str, Any] | None = None,
    watermark: str | None = None,
    method: str = "dwtDctSvd",
) -> VerifyReport:
    """Check every image under `urls`; ImagemillError when they hold none, or for a bad payload."""
    if watermark is not None:
        try:
            payload_bits(watermark)
        except ValueError as exc:
            raise ImagemillError(f"--watermark: {exc}") from None
    checks = [
        check_image(name, data, watermark, method)
        for url in urls
        for name, data in _images(url, storage_options or {})
    ]
    if not checks:
        raise ImagemillError(
            f"no image found in {', '.join(urls)} (png, jpg, webp files, tars or data Parquet)"
        )
    return VerifyReport(checks)
