"""One image decoder (imagemill.core.images.decode_image) for every image the project reads: sources,
references, `imagemill verify`, reports. Untrusted bytes give a loaded image within the pixel limit or
InvalidImage, never another exception, a hang or a non-raster decoder (Ghostscript)."""

from __future__ import annotations

import ast
import io
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagemill.core.images import IMAGE_FORMATS, InvalidImage, decode_image
from imagemill.workers.source_images import decode as decode_source

ROOT = Path(__file__).resolve().parent.parent
DECODER = ROOT / "pipeline" / "core" / "images.py"
# What opens image files: Pillow's Image.open, and the other libraries' readers.
FORBIDDEN_CALLS = {("Image", "open"), ("PIL.Image", "open"), ("cv2", "imread"), ("cv2", "imdecode")}
FORBIDDEN_MODULES = ("imageio", "cv2", "skimage.io")
MAX_PIXELS = 10_000


def _opens_images(path: Path, root: Path = ROOT) -> list[str]:
    """Lines of `path` that open an image outside the decoder."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if (owner, node.func.attr) in FORBIDDEN_CALLS:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module == "PIL.Image":
                names += [f"PIL.Image.{a.name}" for a in node.names]
            for name in names:
                if name.startswith(FORBIDDEN_MODULES) or name == "PIL.Image.open":
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {name}")
    return found


def test_no_code_opens_an_image_outside_the_one_decoder():
    """Every image the project reads goes through core/images.py's allow-list, pixel limit and errors.
    No exemption: the builders (pipeline/testing, pipeline/demo) read images through it too."""
    sources = [p for folder in ("pipeline", "workers") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert DECODER in sources
    offenders = [line for path in sources if path != DECODER for line in _opens_images(path)]
    assert offenders == []


def test_the_guard_sees_each_way_of_opening_an_image(tmp_path):
    """The guard above can fail: each spelling of an image read is found."""
    code = tmp_path / "reader.py"
    code.write_text(
        "import imageio\nimport PIL.Image\nfrom PIL import Image\nfrom PIL.Image import open\nimport cv2\n"
        "Image.open(f)\nPIL.Image.open(f)\ncv2.imread(p)\n"
    )
    found = sorted(_opens_images(code, tmp_path), key=lambda line: int(line.split(":")[1]))
    assert [line.split(": ", 1)[1] for line in found] == [
        "import imageio", "import PIL.Image.open", "import cv2", "Image.open", "PIL.Image.open", "cv2.imread"
    ]  # fmt: skip


def _encoded(image_format: str, mode: str = "RGB", **options) -> bytes:
    """A small noisy 20x24 image, so that every mutation lands in real compressed data."""
    pixels = np.random.default_rng(len(image_format)).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, image_format, **options)
    return buffer.getvalue()


SEEDS = {
    **{name: _encoded(name) for name in IMAGE_FORMATS},
    "PNG-P": _encoded("PNG", "P"),
    "JPEG-L": _encoded("JPEG", "L"),
    "TIFF-deflate": _encoded("TIFF", compression="tiff_deflate"),
    "GIF-L": _encoded("GIF", "L"),
}


def test_every_allowed_format_decodes_and_others_are_refused():
    for name, data in SEEDS.items():
        assert decode_image(data, MAX_PIXELS).size == (20, 24), name
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data, why in [(eps, "not an image in a supported format"), (b"", "empty"),
                      (_encoded("PPM"), "not an image in a supported format")]:  # fmt: skip
        with pytest.raises(InvalidImage, match=why):
            decode_image(data, MAX_PIXELS)
    with pytest.raises(InvalidImage, match="20x24 is more pixels than the limit \\(400\\)"):
        decode_image(SEEDS["PNG"], 400)


def _mutated(data: bytes, rng: random.Random) -> bytes:
    """`data` truncated, with bits flipped, or with garbage in its header, or all three."""
    mutated = bytearray(data[: rng.randint(1, len(data))] if rng.random() < 0.5 else data)
    for _ in range(rng.choice((0, 1, 3, 8))):
        mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
    for _ in range(rng.choice((0, 0, 1, 4))):
        mutated[rng.randrange(min(64, len(mutated)))] = rng.randrange(256)
    return bytes(mutated)


MUTANTS_PER_EXAMPLE = 10  # 400 examples x 10: thousands of files in a few seconds


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(sorted(SEEDS)), rng=st.randoms(use_true_random=False))
@pytest.mark.filterwarnings("ignore::UserWarning")  # TIFF's metadata warnings, Pillow's bomb warning
def test_mutated_files_decode_within_limits_or_raise_invalid_image(seed, rng):
    for _ in range(MUTANTS_PER_EXAMPLE):
        data = _mutated(SEEDS[seed], rng)
        started = time.monotonic()
        try:
            image = decode_image(data, MAX_PIXELS)
        except InvalidImage as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert image.width * image.height <= MAX_PIXELS and image.format in IMAGE_FORMATS
            image.convert("RGB")  # loaded: no decoding is left for later
        assert time.monotonic() - started < 2, data


def _broken_bmp_header() -> bytes:
    data = bytearray(SEEDS["BMP"])
    data[30] = 0x77  # the compression field: no such compression
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        SEEDS["JPEG"][:100],
        SEEDS["WEBP"][: len(SEEDS["WEBP"]) * 2 // 3],
        _broken_bmp_header(),
    ],
    ids=["truncated-jpeg", "truncated-webp", "bmp-broken-header"],
)
def test_a_truncated_or_broken_source_is_an_invalid_image_not_an_os_error(data):
    """These raised OSError past the source decoder (a JPEG cut in its header, a WebP cut anywhere, a BMP
    naming an unknown compression): every attempt of their shard failed, on every re-run."""
    with pytest.raises(InvalidImage, match="does not (read|decode)"):
        decode_source(data, MAX_PIXELS)
