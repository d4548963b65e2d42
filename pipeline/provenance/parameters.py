"""Generation parameters inside each image file, where image tools and sites look for them.

- PNG: iTXt chunks (UTF-8; tEXt is Latin-1 only): `parameters` in the A1111 layout that Civitai, A1111
  and most viewers parse, `imagemill` with the image's metadata row as JSON, and XMP.
- JPEG and WebP: EXIF UserComment (the A1111 text, "UNICODE" prefix + UTF-16 in the EXIF's byte
  order), EXIF ImageDescription (the JSON, ASCII-escaped, as EXIF ASCII requires), and XMP.
- XMP in all three: IPTC `DigitalSourceType` = trainedAlgorithmicMedia (the AI-generated label of EU AI
  Act Art. 50 / SB 942 tooling), and the same two texts as `imagemill:parameters`/`imagemill:metadata`.

The A1111 layout: the prompt drawn (lines as they are), then `Negative prompt: …`, then one line of
`Key: value` pairs, a value holding `,`, `:` or a newline JSON-quoted, as A1111's own writer does;
`Sampler` by A1111's name ("DPM++ 2M Karras"), or the diffusers class where A1111 has none.
The row given here is already in its published form (publication.py decides what that holds).
The JSON is exact; a prompt line that itself starts with "Negative prompt:" makes the A1111 text
ambiguous, as it is in A1111.

JPEG keeps EXIF and XMP in 64 KB segments each: when a row's texts do not fit, the file's copy of the
prompts is cut (the JSON then says `"prompts_cut": true`); the metadata Parquet keeps them whole.
Nothing here depends on time or place, so a fixed spec embeds the same bytes on every run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

from imagemill.core.records import MetadataRow

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
JPEG_SEGMENT_BYTES = 65_000  # an APP1 segment holds 65,533 bytes; the XMP one less its namespace header
# unknown while encoding (a file cannot hold its own hash, nor whether its watermark reads back from it),
# or meaningless for an image
NOT_IN_FILE = ("path", "sha256", "watermark_ok", "key", "error")
PROMPT_FIELDS = ("prompt", "expanded_prompt", "negative_prompt")
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
EXIF_IFD, IMAGE_DESCRIPTION, SOFTWARE, USER_COMMENT = 0x8769, 0x010E, 0x0131, 0x9286
MODEL_HASH_PREFIX = "sha256:"  # a published `model` that is the model's content hash (publication.py)


@dataclass(frozen=True)
class ModelFacts:
    """What the files say about the model beyond the metadata row, found once per actor."""

    model_hash: str | None  # model_hash.py; None where the model has no files (noop)
    scheduler: str | None  # the sampler as the metadata's `scheduler` column names it (diffusers only)
    sampler: str | None  # A1111's name for it (core/schedulers.py a1111_sampler); None where it has none
    loras: list[dict[str, Any]]  # source, weight_name, scale per LoRA
    software: str  # "imagemill <version>"
    provenance: dict[str, Any]  # the watermark payload and method, whether C2PA signs: for `verify`


def _quote(value: Any) -> str:
    """A1111's quoting of a value in its parameters line."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_text(row: MetadataRow, facts: ModelFacts) -> str:
    """The `parameters` text in the A1111 layout."""
    hashed = row.model.startswith(MODEL_HASH_PREFIX)  # a model with no public name: "Model hash" names it
    model_name = row.model.rstrip("/").rsplit("/", 1)[-1] if row.model and not hashed else None
    pairs = {
        "Steps": row.num_inference_steps,
        "Sampler": facts.sampler or facts.scheduler,
        "CFG scale": None if row.guidance_scale is None else f"{row.guidance_scale:g}",
        "Seed": row.seed,
        "Size": f"{row.width}x{row.height}",
        "Model hash": facts.model_hash[:10] if facts.model_hash else None,
        "Model": model_name,
        "Version": facts.software,
    }
    lines = [row.expanded_prompt or row.prompt or ""]
    if row.negative_prompt:
        lines.append(f"Negative prompt: {row.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def metadata_json(row: MetadataRow, facts: ModelFacts, ascii_only: bool = False, **extra: Any) -> str:
    """The row's metadata (less what is unknown while encoding) with the model's facts, as JSON."""
    record = {name: value for name, value in row.columns().items() if name not in NOT_IN_FILE}
    record.update(
        **extra,
        model_hash=facts.model_hash,
        scheduler=facts.scheduler,
        loras=facts.loras,
        software=facts.software,
        **facts.provenance,
    )
    return json.dumps(record, ensure_ascii=ascii_only, sort_keys=True, allow_nan=False)


def xmp_packet(parameters: str, metadata: str) -> bytes:
    """An XMP packet with the IPTC digital source type and both texts (characters XML cannot hold
    become U+FFFD; the JSON's are escaped already)."""

    def text(value: str) -> str:
        return escape(_XML_INVALID.sub("\ufffd", value))

    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:imagemill="https://imagemill.dev/xmp/1.0/"'
        f' Iptc4xmpExt:DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}">'
        f"<imagemill:parameters>{text(parameters)}</imagemill:parameters>"
        f"<imagemill:metadata>{text(metadata)}</imagemill:metadata>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def _exif(parameters: str, metadata_ascii: str, software: str) -> bytes:
    exif = Image.Exif()
    exif[IMAGE_DESCRIPTION] = metadata_ascii
    exif[SOFTWARE] = software
    byte_order = "utf-16-le" if exif.endian == "<" else "utf-16-be"  # UNICODE follows the EXIF's order
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode(byte_order)
    return exif.tobytes()


def _cut_prompts(row: MetadataRow, limit: int) -> MetadataRow:
    cut = {name: getattr(row, name) for name in PROMPT_FIELDS}
    return replace(
        row, **{name: text[:limit] + "…" for name, text in cut.items() if text and len(text) > limit}
    )


def save_options(row: MetadataRow, facts: ModelFacts, image_format: str) -> dict[str, Any]:
    """Pillow `save` keyword arguments that embed the row's parameters in `image_format`."""
    if image_format == "png":
        info = PngImagePlugin.PngInfo()
        parameters, metadata = a1111_text(row, facts), metadata_json(row, facts)
        info.add_itxt("parameters", parameters)
        info.add_itxt("imagemill", metadata)
        info.add_itxt("XML:com.adobe.xmp", xmp_packet(parameters, metadata).decode("utf-8"))
        return {"pnginfo": info}
    limit: int | None = None
    while True:
        shown = row if limit is None else _cut_prompts(row, limit)
        cut = {"prompts_cut": True} if limit is not None else {}
        parameters, metadata = a1111_text(shown, facts), metadata_json(shown, facts, ascii_only=True, **cut)
        exif, xmp = _exif(parameters, metadata, facts.software), xmp_packet(parameters, metadata)
        if image_format != "jpeg" or max(len(exif), len(xmp)) <= JPEG_SEGMENT_BYTES:
            return {"exif": exif, "xmp": xmp}
        if limit == 0:
            raise ValueError(
                f"row {row.id}: its parameters do not fit a JPEG's 64 KB EXIF even without prompts"
            )
        longest = max(len(getattr(row, name) or "") for name in PROMPT_FIELDS)
        limit = (longest if limit is None else limit) // 2


XMP_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\0"


def jpeg_with_metadata(data: bytes, exif: bytes | None = None, xmp: bytes | None = None) -> bytes:
    """JPEG bytes encoded elsewhere (nvJPEG on the GPU) with EXIF and XMP added as APP1 segments right
    after the start-of-image marker, where Pillow's own `save(exif=, xmp=)` puts them, without decoding or
    re-encoding the image."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not JPEG bytes: no start-of-image marker")
    segments = b""
    for payload in (exif, None if xmp is None else XMP_NAMESPACE + xmp):
        if payload:
            if len(payload) + 2 > 0xFFFF:
                raise ValueError(f"a JPEG segment holds at most 65533 bytes, got {len(payload)}")
            segments += b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + segments + data[2:]
