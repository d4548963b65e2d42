"""Image-to-image sources: each row's source image found, read, checked and brought to the row's size.

A source is the row's `input.image_column` value: image bytes, or a path. Every value comes from the
input's owner (or whoever can write its bucket), so the worst value is planned for:

- A relative path is read from the input file's folder (`input.format: images`: from the image
  folder, imagemill.core.image_folder's `source_folder`), with the input's storage options, and must
  stay inside it: `../../etc/passwd` (or `a/../../b`) is refused, and so is `::` (fsspec's
  chaining). An absolute path or a URL (`/etc/passwd`, `s3://other-bucket/x`, `file:///…` from an
  s3 input) is refused unless `input.allow_absolute_image_paths`; then it is opened with the
  input's storage options where its protocol is the input's, and with none elsewhere (an s3
  credential never goes to another protocol).
- A local path is resolved (symbolic links followed) before it is checked, so a link inside the
  folder that points out of it is refused like `../`; only regular files are read (a FIFO or a
  device would block the read, or never end it).
- Every read, retries included, is bounded by SOURCE_READ_SECONDS: a store or a file that never
  answers makes the row `invalid_image` instead of hanging the shard (the stalled read is left to a
  daemon thread).
- Files over MAX_SOURCE_BYTES are not read whole; images over `input.max_image_pixels` are refused
  from their header, before any pixel is decoded (Pillow's own limit only warns below 2x its cap).
- Decoding is imagemill.core.images.decode_image's (the format allow-list, the pixel limit, one error
  for every way a file can be corrupt or truncated).
- CMYK, 16-bit and float, and images with alpha (or a transparent palette) are refused rather than
  converted: how to flatten alpha or map CMYK is the user's choice, and a silent conversion would
  change the picture. 8-bit grey, black-and-white and opaque palette images become RGB, which loses
  nothing.

A source that fails any of these makes its row an `invalid_image` error; the shard goes on. Inpainting
masks (`input.mask_column`, workers/masks.py) and super-resolution references (`input.reference_column`,
`reference_pixels`) are read by the same reader and decoder, and a bad one is the row's `invalid_mask` or
`invalid_reference` error, naming its column.
"""

from __future__ import annotations

import os
import posixpath
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from imagemill.core.image_folder import source_folder
from imagemill.core.images import InvalidImage, decode_image
from imagemill.core.spec import GenerationSpec, InputSpec
from imagemill.core.storage import filesystem, is_local, retrying
from imagemill.workers.masks import check_size, mask_values, shape_mask

if TYPE_CHECKING:
    from imagemill.workers.rows import Row

MAX_SOURCE_BYTES = 64 * 1024 * 1024
SOURCE_READ_SECONDS = 60.0  # one source's read, retries included (a 64 MiB file over a slow link fits)
READ_THREADS = 8  # sources are small reads: overlap their latency (object stores)
RESAMPLING = Image.Resampling.LANCZOS
PAD_COLOUR = (0, 0, 0)


class SourceReader:
    """Reads the sources of one input file's rows: bytes as given, paths under their folder (the
    file's, or the image folder the file lists)."""

    def __init__(self, input_file: str, spec: InputSpec):
        self.spec = spec
        self.folder = source_folder(spec, input_file)
        self.folder_named = "the image folder" if spec.format == "images" else "the input file's folder"
        self.protocol = _protocol(self.folder)

    def location(self, value: str) -> str:
        """The URL or path `value` names, under the policy of the module docstring."""
        if not value.strip():
            raise InvalidImage("the image path is empty")
        if "\x00" in value:
            raise InvalidImage("the image path holds a NUL character")
        if "::" in value:  # fsspec would read it as a chain of filesystems, and open another file
            raise InvalidImage(f"{value!r} holds '::' (fsspec URL chaining); rename the file")
        if "://" in value or value.startswith(("/", "\\")):
            if not self.spec.allow_absolute_image_paths:
                raise InvalidImage(
                    f"{value!r} is absolute or a URL; paths are relative to {self.folder_named} "
                    "(set input.allow_absolute_image_paths to allow others)"
                )
            return value
        relative = posixpath.normpath(value.replace("\\", "/"))
        if relative == ".." or relative.startswith("../"):
            raise InvalidImage(f"{value!r} leaves {self.folder_named}")
        return f"{self.folder}/{relative}"

    def read(self, value: Any) -> bytes:
        """The source's bytes: the value itself, or the file it names."""
        if isinstance(value, bytes):
            return value
        if value is None:
            raise InvalidImage("the column's value is null")
        if not isinstance(value, str):
            raise InvalidImage(f"the image column holds a {type(value).__name__}, not bytes or a path")
        url = self.location(value)
        options = self.spec.storage_options if _protocol(url) == self.protocol else {}
        try:
            fs, path = filesystem(url, options)
            if is_local(fs):
                path = self._local_file(path, value, contained=url.startswith(f"{self.folder}/"))
                data = _within(SOURCE_READ_SECONDS, lambda: _read_local(path, value), value)
            else:

                def read() -> bytes:
                    with fs.open(path, "rb") as f:
                        return f.read(MAX_SOURCE_BYTES + 1)

                data = _within(SOURCE_READ_SECONDS, lambda: retrying(read, f"reading {value}"), value)
        except FileNotFoundError:
            raise InvalidImage(f"{value!r} not found") from None
        except (OSError, ValueError, ImportError) as exc:
            raise InvalidImage(f"{value!r} could not be read ({type(exc).__name__})") from None
        if len(data) > MAX_SOURCE_BYTES:
            raise InvalidImage(f"{value!r} is larger than {MAX_SOURCE_BYTES // 2**20} MiB")
        return data

    def _local_file(self, path: str, value: str, contained: bool) -> str:
        """`path` with every symbolic link resolved; InvalidImage when a relative source's file is out
        of the input folder once resolved (`contained`)."""
        real = os.path.realpath(path)
        if contained:
            folder = os.path.realpath(filesystem(self.folder)[1])
            if os.path.commonpath([folder, real]) != folder:
                raise InvalidImage(f"{value!r} leaves {self.folder_named} (through a symbolic link)")
        return real


def _read_local(path: str, value: str) -> bytes:
    """A resolved local file's first MAX_SOURCE_BYTES + 1 bytes; InvalidImage when it is not a regular
    file. Opened without blocking and checked on the open descriptor, so a FIFO swapped in after the
    path was resolved is refused too."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as f:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise InvalidImage(f"{value!r} is not a regular file")
        return f.read(MAX_SOURCE_BYTES + 1)


def _within(seconds: float, read: Callable[[], bytes], value: str) -> bytes:
    """`read()`'s bytes, or InvalidImage when it has not returned after `seconds`. The read runs on a
    daemon thread, which a stalled read leaves behind: no Python call can interrupt a blocked read."""
    outcome: list[bytes | BaseException] = []

    def run() -> None:
        try:
            outcome.append(read())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome.append(exc)

    thread = threading.Thread(target=run, name="imagemill-source-read", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise InvalidImage(f"{value!r} was not read within {seconds:g} s (SOURCE_READ_SECONDS)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The source as an RGB image, or InvalidImage saying why it cannot be one (the row's error detail)."""
    image = decode_image(data, max_pixels, "input.max_image_pixels")
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        raise InvalidImage(f"the image has an alpha channel ({mode}); flatten it to RGB first")
    if mode not in ("RGB", "L", "P", "1"):
        raise InvalidImage(f"image mode {mode} (CMYK, 16-bit or float) is not 8-bit RGB or grey")
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a corrupt EXIF orientation block, whatever Pillow raises
        raise InvalidImage(f"the image's EXIF does not read: {type(exc).__name__}") from None


def fit(image: Image.Image, width: int, height: int, resize: str) -> np.ndarray:
    """The image at width x height as (height, width, 3) uint8: `center_crop` scales it to cover the
    size and crops the middle, `pad` scales it to fit and pads with black, `stretch` ignores its
    aspect ratio; `keep` (enhance-only) leaves it at its own size, which becomes the row's."""
    size = (width, height)
    if resize == "keep":
        return np.asarray(image, dtype=np.uint8)
    if resize == "center_crop":
        image = ImageOps.fit(image, size, RESAMPLING)
    elif resize == "pad":
        image = ImageOps.pad(image, size, RESAMPLING, color=PAD_COLOUR)
    else:
        image = image.resize(size, RESAMPLING)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class _Loaded:
    """What one input row's images came to, each at the size its use needs (None: not asked for)."""

    source: np.ndarray | None = None
    mask: np.ndarray | None = None
    reference: np.ndarray | None = None


def reference_pixels(
    reader: SourceReader, row: Row, spec: InputSpec, upscale: int, size: tuple[int, int]
) -> np.ndarray:
    """The row's reference (`input.reference_column`) as (H, W, 3) uint8, read and decoded as a source
    is; InvalidImage when it is not the size the row is written at: its `size` (height, width: the
    row's, or its source's own under `generation.resize: keep`) times its scale (the row's, else the
    upscaler's `upscale`). Never resized: a resized reference would measure the resize."""
    image = decode(reader.read(row.reference), spec.max_image_pixels)
    scale = row.scale or upscale
    width, height = size[1] * scale, size[0] * scale
    # a scale the upscaler cannot give makes the row model_rejected at the upscale stage, not here
    if upscale % scale == 0 and image.size != (width, height):
        raise InvalidImage(
            f"the reference is {image.width}x{image.height} but the upscaled image is {width}x{height} "
            f"({size[1]}x{size[0]} x{scale}); give a reference of {width}x{height}"
        )
    return np.asarray(image, dtype=np.uint8)


def load_sources(
    rows: list[Row], input_file: str, spec: InputSpec, generation: GenerationSpec, upscale: int | None
) -> None:
    """Give each valid row its source pixels at its size (under `generation.resize: keep`, the source's
    own, which becomes the row's) and with `input.mask_column` its mask
    (workers/masks.py); with `input.reference_column` its reference at its written size (`upscale`: the
    upscaler's scale). A bad source makes the row `invalid_image`, a bad mask `invalid_mask`, a bad
    reference or one of another size `invalid_reference`: each names the file to fix.

    Images of one input row (images_per_prompt, variants) share its source, mask and reference, read once."""
    reader = SourceReader(input_file, spec)
    wanted = [row for row in rows if row.error is None]

    def load(row: Row) -> _Loaded | str:
        loaded = _Loaded()
        if spec.image_column is not None:
            try:
                image = decode(reader.read(row.source), spec.max_image_pixels)
            except InvalidImage as exc:
                return f"invalid_image: {exc}"
            loaded.source = fit(image, row.width, row.height, generation.resize)
            if spec.mask_column is not None:
                try:
                    mask = mask_values(reader.read(row.mask), spec.max_image_pixels)
                    check_size(mask, image)
                except InvalidImage as exc:
                    return f"invalid_mask: {spec.mask_column}: {exc}"
                fitted = fit(mask.convert("RGB"), row.width, row.height, generation.resize)[..., 0]
                loaded.mask = shape_mask(fitted, generation)
        if spec.reference_column is not None and row.reference is not None:  # null: not measured
            assert upscale is not None  # the spec refuses a reference column without upscale:
            try:
                size = (row.height, row.width) if loaded.source is None else loaded.source.shape[:2]
                loaded.reference = reference_pixels(reader, row, spec, upscale, size)
            except InvalidImage as exc:
                return f"invalid_reference: {spec.reference_column}: {exc}"
        return loaded

    by_input_row: dict[tuple[int, int, int], Row] = {}
    for row in wanted:
        by_input_row.setdefault((row.input_row, row.width, row.height), row)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="imagemill-sources") as pool:
        loaded = dict(zip(by_input_row, pool.map(load, by_input_row.values()), strict=True))
    for row in wanted:
        result = loaded[(row.input_row, row.width, row.height)]
        if isinstance(result, str):
            row.error = result
        else:
            row.source_pixels, row.mask_pixels = result.source, result.mask
            row.reference_pixels = result.reference
            if result.source is not None:
                # the row's size is its source's: the fitted one, or the source's own under `keep`, set
                # before make_batches so that a batch (one BatchKey) holds images of one size
                row.height, row.width = result.source.shape[:2]
