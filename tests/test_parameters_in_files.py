"""Generation parameters inside PNG, JPEG and WebP files, read back by Pillow and by exiftool.

The rows carry the worst texts a prompt column may hold: newlines, quotes, commas and colons (which
A1111's layout quotes), text outside Latin-1, and for JPEG a 1 MB prompt that cannot fit its 64 KB
EXIF. The A1111 `parameters` text is parsed by a small parser written here to the published layout.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import imagemill
from imagemill.core.images import encode_image
from imagemill.core.records import MetadataRow
from imagemill.provenance.encoder import ImageEncoder
from imagemill.provenance.model_hash import directory_hash
from imagemill.provenance.parameters import (
    EXIF_IFD,
    TRAINED_ALGORITHMIC_MEDIA,
    USER_COMMENT,
    ModelFacts,
)
from imagemill.provenance.publication import Publication

PROMPTS = {
    "plain": "a red circle on the left on a white background",
    "worst": 'line one, with "quotes": and colons\nline two 猫 🙂 Ωmega\tend',
}
FACTS = ModelFacts(
    model_hash="ab" * 32,
    scheduler="DPMSolverMultistepScheduler(use_karras_sigmas=true)",
    sampler="DPM++ 2M Karras",
    loras=[{"source": "/loras/style", "weight_name": None, "scale": 0.8}],
    software="imagemill 0.1.0",
    provenance={},
)
# A1111's own parameter pattern (modules/infotext_utils.py: re_param_code)
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    """The A1111 layout: prompt lines, then `Negative prompt:` lines, then the `Key: value, ...` line."""
    *lines, last = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    pairs = {
        key: json.loads(value) if value.startswith('"') else value for key, value in A1111_PAIR.findall(last)
    }
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative), **pairs}


def _row(prompt: str, **changes) -> MetadataRow:
    values = dict(
        id="row-1",
        prompt=prompt,
        prompt_truncated=False,
        negative_prompt="blurry, low quality: 2 ünïcode",
        seed=2**62 + 5,
        num_inference_steps=4,
        guidance_scale=7.5,
        width=64,
        height=32,
        status="ok",
        model="s3://bucket/models/demo-shapes",
        input_file="s3://bucket/in.parquet",
        input_row=3,
    )
    return MetadataRow(**{**values, **changes})


def _encode(image_format: str, row: MetadataRow, **output) -> bytes:
    spec = imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out", "image_format": image_format, **output},
            "model": {"source": "/model"},
        }
    )
    pixels = np.asarray(Image.radial_gradient("L").resize((row.width, row.height)).convert("RGB"))
    publication = Publication.of(spec.output.embed_parameters, row.model, FACTS)
    return ImageEncoder(spec.output, publication, None).encode(pixels, row).data


def _pillow_texts(data: bytes) -> tuple[str, dict]:
    """(A1111 text, JSON) as Pillow reads them: PNG text chunks, else EXIF UserComment/ImageDescription."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info["parameters"], json.loads(image.info["imagemill"])
    exif = image.getexif()
    comment = exif.get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment[:8] == b"UNICODE\0"
    text = comment[8:].decode("utf-16-be" if exif.endian == ">" else "utf-16-le")
    return text, json.loads(exif[0x010E])


def _exiftool(data: bytes, tmp_path, image_format: str) -> dict:
    path = tmp_path / f"image.{image_format}"
    path.write_bytes(data)
    result = subprocess.run(["exiftool", "-j", "-G1", str(path)], capture_output=True, check=True)
    return json.loads(result.stdout)[0]


def _expect(row: MetadataRow, text: str, record: dict) -> None:
    parsed = parse_a1111(text)
    assert parsed["prompt"] == row.prompt
    assert parsed["negative"] == row.negative_prompt
    assert parsed["Steps"] == str(row.num_inference_steps)
    assert parsed["Seed"] == str(row.seed)
    assert parsed["CFG scale"] == "7.5"
    assert parsed["Size"] == f"{row.width}x{row.height}"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["Model hash"] == FACTS.model_hash[:10]
    assert "Model" not in parsed, "a model in a bucket has no public name: its hash names it"
    for name in ("id", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width"):
        assert record[name] == getattr(row, name), name
    assert record["model_hash"] == FACTS.model_hash and record["scheduler"] == FACTS.scheduler
    assert record["model"] == f"sha256:{FACTS.model_hash}" and record["input_file"] == "in.parquet"
    assert record["loras"] == [{"source": None, "weight_name": None, "scale": 0.8}]


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool (libimage-exiftool-perl)")
@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_parameters_read_back_by_pillow_and_exiftool(tmp_path, image_format, prompt):
    row = _row(prompt)
    data = _encode(image_format, row)
    _expect(row, *_pillow_texts(data))
    tags = _exiftool(data, tmp_path, image_format)
    assert tags["XMP-iptcExt:DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    text = tags["PNG:Parameters"] if image_format == "png" else tags["ExifIFD:UserComment"]
    record = json.loads(tags["PNG:Imagemill"] if image_format == "png" else tags["IFD0:ImageDescription"])
    _expect(row, text, record)
    _expect(row, tags["XMP-imagemill:Parameters"], json.loads(tags["XMP-imagemill:Metadata"]))


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_a_one_megabyte_prompt_is_embedded_whole_or_cut_where_the_format_cannot_hold_it(image_format):
    row = _row("猫 and a dog, " * 80_000)  # 1.1 MB of UTF-8
    text, record = _pillow_texts(_encode(image_format, row))
    if image_format == "jpeg":  # EXIF and XMP segments hold 64 KB each
        assert record["prompts_cut"] is True and row.prompt.startswith(record["prompt"].rstrip("…"))
        assert len(record["prompt"]) < 20_000
    else:
        assert record["prompt"] == row.prompt and "prompts_cut" not in record
        assert parse_a1111(text)["prompt"] == row.prompt


def test_embed_parameters_none_writes_a_bare_file_and_changes_the_fingerprint():
    row = _row(PROMPTS["plain"])
    bare = Image.open(io.BytesIO(_encode("png", row, embed_parameters="none")))
    assert "parameters" not in bare.info and "imagemill" not in bare.info
    specs = [
        imagemill.build_spec(
            {"input": {"path": "/in"}, "output": {"path": "/o", **o}, "model": {"source": "/m"}}
        )
        for o in ({}, {"embed_parameters": "none"})
    ]
    assert specs[0].fingerprint()["output"]["embed_parameters"] == "public"
    assert specs[1].fingerprint()["output"]["embed_parameters"] == "none"


def test_the_same_row_embeds_the_same_bytes():
    row = _row(PROMPTS["worst"])
    assert _encode("png", row) == _encode("png", row)


def test_model_hash_covers_every_file_of_the_directory(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "weights.safetensors").write_bytes(b"weights")
    first = directory_hash(model)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert directory_hash(copy) == first, "the same files elsewhere have the same hash"
    (model / "unet" / "weights.safetensors").write_bytes(b"weightz")  # same size, other values
    assert directory_hash(model) != first


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool (libimage-exiftool-perl)")
def test_jpeg_bytes_encoded_elsewhere_get_the_same_parameters_and_keep_their_image(tmp_path):
    """nvJPEG's bytes (device_jpeg.py) reach the encoder already encoded: the parameters are added as
    segments, read back as from a Pillow-encoded file, and the image data is untouched. A bare Pillow
    JPEG stands in for nvJPEG's here (no GPU)."""
    row = _row(max(PROMPTS.values(), key=len))
    pixels = np.asarray(Image.radial_gradient("L").resize((row.width, row.height)).convert("RGB"))
    bare = encode_image(pixels, "jpeg", 90)
    spec = imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out", "image_format": "jpeg"},
            "model": {"source": "/m"},
        }
    )
    data = ImageEncoder(spec.output, Publication.of("public", row.model, FACTS), None).encode(bare, row).data
    _expect(row, *_pillow_texts(data))
    tags = _exiftool(data, tmp_path, "jpeg")
    assert tags["XMP-iptcExt:DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    _expect(row, tags["ExifIFD:UserComment"], json.loads(tags["IFD0:ImageDescription"]))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(io.BytesIO(bare))))
