"""`imagemill verify`: what a published image file says about itself, checked from the file alone.

For each image (a file, a folder searched for images, WebDataset tars and `parquet`-format data files,
local or any fsspec URL):

- parameters: the `imagemill` JSON the actors embed (PNG iTXt; JPEG/WebP EXIF ImageDescription);
- C2PA: the manifest, validated by c2pa-python's Reader (signature, certificate profile, the hash of
  the image's bytes, which covers the embedded parameters); a manifest that does not validate, or
  none where the file's parameters say it was signed, fails the file;
- watermark: with `--watermark PAYLOAD`, or where the file's parameters name one, the payload is read
  back from the pixels; not found fails the file, and so does a payload the spec would refuse
  (low-entropy, forged: core.spec.WatermarkSpec is the rule).

Each file is then reported by the strength of what backs its claims (`Strength`): a valid signed
manifest, unsigned claims only (parameters anyone can write, a watermark found without a signature),
nothing at all, or failed. Only the first is verified. A file that cannot be read or checked is one
FAILED line; the others are still checked. Exit status (cli.commands): 0 when every file is signed,
1 when any failed, NOT_VERIFIED_EXIT_STATUS when none failed but some are not signed.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from imagemill.core.errors import ImagemillError, one_line
from imagemill.core.images import InvalidImage, decode_image
from imagemill.core.spec import WatermarkSpec, payload_bits
from imagemill.core.storage import filesystem
from imagemill.provenance import optional_library
from imagemill.provenance.c2pa_signing import MIME_TYPES
from imagemill.provenance.parameters import IMAGE_DESCRIPTION
from imagemill.provenance.watermark import is_found, wrong_bits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg"}
SIGNED_STATES = ("Valid", "Trusted")
NOT_VERIFIED_EXIT_STATUS = 3  # no file failed, but some carry only unsigned claims, or nothing


class Strength(Enum):
    """What backs a file's claims, strongest first; the value starts the file's line."""

    SIGNED = "SIGNED"  # a C2PA manifest that validates: its bytes, parameters included, are signed
    UNSIGNED = "UNSIGNED"  # parameters or a found watermark, which anyone could have put there
    NOTHING = "NOTHING"  # no parameters, no manifest, no watermark
    FAILED = "FAILED"  # a check failed, or the file could not be checked


@dataclass
class FileCheck:
    """What one image file says, and why it fails (empty `problems`: no check failed)."""

    name: str
    parameters: dict[str, Any] | None = None
    c2pa: str | None = None  # the Reader's validation state (Valid, Trusted, Invalid); None: no manifest
    watermark_wrong_bits: int | None = None  # None: not checked
    watermark_found: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def strength(self) -> Strength:
        if self.problems:
            return Strength.FAILED
        if self.c2pa in SIGNED_STATES:
            return Strength.SIGNED
        if self.parameters is not None or self.watermark_found:
            return Strength.UNSIGNED
        return Strength.NOTHING

    def line(self) -> str:
        """`STRENGTH name: what was found`, one line."""
        strength = self.strength
        watermark = (
            f"watermark found ({self.watermark_wrong_bits} bits wrong)" if self.watermark_found else None
        )
        claims = ", ".join(filter(None, ["parameters" if self.parameters is not None else None, watermark]))
        if strength is Strength.FAILED:
            detail = "; ".join(self.problems)
        elif strength is Strength.SIGNED:
            detail = f"C2PA manifest {self.c2pa.lower()}" + (f"; signed claims: {claims}" if claims else "")
        elif strength is Strength.UNSIGNED:
            detail = f"unsigned claims only, not verified: {claims}"
        else:
            detail = "no parameters, C2PA manifest or watermark: nothing to verify"
        return f"{strength.value} {self.name}: {detail}"


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


def declared_watermark(parameters: dict[str, Any]) -> WatermarkSpec | None:
    """The watermark a file's parameters name, checked by the spec's own rule; ValueError when it is
    one the spec would refuse (a forged or low-entropy payload, an unknown method)."""
    declared = parameters.get("watermark")
    if declared is None:
        return None
    try:
        return WatermarkSpec.model_validate(declared)
    except ValidationError as exc:
        raise ValueError(str(ImagemillError.invalid("the watermark its parameters name", exc))) from None


def check_image(name: str, data: bytes, watermark: str | None = None, method: str = "dwtDctSvd") -> FileCheck:
    """Check one image's bytes; `watermark`: a payload to look for (else the one its parameters name)."""
    check = FileCheck(name)
    kind = image_format(data)
    if kind is not None:  # the manifest's hash of the bytes holds whether or not they still decode
        check.c2pa, failures = c2pa_state(data, kind)
        if check.c2pa == "Invalid":
            check.problems.append(f"C2PA manifest does not validate: {', '.join(failures) or 'invalid'}")
    try:
        image = decode_image(data)
        pixels = np.asarray(image.convert("RGB"))
    except InvalidImage as exc:
        check.problems.append(f"does not decode as an image: {exc}")
        return check
    check.parameters = embedded_parameters(image)
    declared = check.parameters or {}
    if check.c2pa is None and declared.get("c2pa"):
        check.problems.append("no C2PA manifest, though its parameters say it was signed")
    if watermark is None:
        try:
            named = declared_watermark(declared)
        except ValueError as exc:
            check.problems.append(str(exc))
            return check
        if named is not None:
            watermark, method = named.payload, named.method
    if watermark:
        check.watermark_wrong_bits = wrong_bits(pixels, watermark, method)
        check.watermark_found = is_found(check.watermark_wrong_bits, watermark)
        if check.watermark_wrong_bits is None:
            check.problems.append("too small to carry the watermark (under 256x256)")
        elif not check.watermark_found:
            check.problems.append(f"watermark not found ({check.watermark_wrong_bits} bits wrong)")
    return check


def _checked(name: str, data: bytes, watermark: str | None, method: str) -> FileCheck:
    """check_image, with anything a hostile file makes a library raise as that file's one problem."""
    try:
        return check_image(name, data, watermark, method)
    except ImagemillError:  # about the command (a missing library), not the file
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others being checked
        return FileCheck(name, problems=[f"could not be checked ({one_line(exc)})"])


def _container_images(fs: Any, path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the images in one file: itself, a tar's images, or a data Parquet's rows."""
    lower = path.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        yield path, fs.cat_file(path)
    elif lower.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    yield f"{path}/{member.name}", tar.extractfile(member).read()
    elif lower.endswith(".parquet"):
        yield from _parquet_images(path, fs.cat_file(path))


def _parquet_images(path: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """A data Parquet's (name, image bytes); none from a Parquet without an `image` column (metadata).

    Read by one ParquetFile on this thread, not `pq.read_table`: its dataset scanner leaves read-ahead
    work on Arrow's thread pool that drops buffers of Python bytes after the call returns, and one
    dropped while the interpreter exits takes the GIL there, which ends the thread by a forced unwind
    through a C++ destructor: `terminate called without an active exception`, exit 134 (issue #24
    item 7; tests/test_verify_exit.py runs the command until it would have shown)."""
    parquet = pq.ParquetFile(pa.BufferReader(data))
    names = parquet.schema_arrow.names
    if "image" not in names:
        return
    table = parquet.read(columns=[name for name in ("id", "image") if name in names], use_threads=False)
    ids = table.column("id").to_pylist() if "id" in names else range(table.num_rows)
    for row_id, image in zip(ids, table.column("image").to_pylist(), strict=True):
        yield f"{path}#{row_id}", image["bytes"]


def _checks(
    url: str, storage_options: dict[str, Any], watermark: str | None, method: str
) -> Iterator[FileCheck]:
    """A check of every image at `url` (a file, or everything under a folder); a file that does not
    read (a broken tar or Parquet) is one failed check, after the images it gave."""
    fs, root = filesystem(url, storage_options)
    for path in sorted(fs.find(root)) if fs.isdir(root) else [root]:
        try:
            for name, data in _container_images(fs, path):
                yield _checked(name, data, watermark, method)
        except ImagemillError:
            raise
        except Exception as exc:  # noqa: BLE001 - a tar or Parquet anyone could have written
            yield FileCheck(path, problems=[f"does not read ({one_line(exc)})"])


@dataclass
class VerifyReport:
    checks: list[FileCheck]

    @property
    def failed(self) -> list[FileCheck]:
        return [check for check in self.checks if check.strength is Strength.FAILED]

    @property
    def exit_status(self) -> int:
        """0: every file signed; 1: some file failed; NOT_VERIFIED_EXIT_STATUS: the rest."""
        if self.failed:
            return 1
        signed = all(check.strength is Strength.SIGNED for check in self.checks)
        return 0 if signed else NOT_VERIFIED_EXIT_STATUS

    def text(self) -> str:
        """One line per file, then the summary."""
        count = {strength: 0 for strength in Strength}
        for check in self.checks:
            count[check.strength] += 1
        watermarked = [check for check in self.checks if check.watermark_found is not None]
        found = sum(bool(check.watermark_found) for check in watermarked)
        summary = (
            f"{len(self.checks)} images: {count[Strength.SIGNED]} signed (valid C2PA manifest), "
            f"{count[Strength.UNSIGNED]} with unsigned claims only, {count[Strength.NOTHING]} with "
            f"nothing to verify, {count[Strength.FAILED]} failed; watermark found in {found} of "
            f"{len(watermarked)} checked"
        )
        return "\n".join([*(check.line() for check in self.checks), summary])


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
    checks = [check for url in urls for check in _checks(url, storage_options or {}, watermark, method)]
    if not checks:
        raise ImagemillError(
            f"no image found in {', '.join(urls)} (png, jpg, webp files, tars or data Parquet)"
        )
    return VerifyReport(checks)
