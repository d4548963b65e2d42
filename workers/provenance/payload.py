"""The watermark payload as bits, and the size the watermark needs: no heavy import, so the job spec
checks both when it loads and `imagemill verify` reads a payload the same way the actors write it."""

from __future__ import annotations

MAX_WATERMARK_BITS = 64  # measured: 48-64 bits come back whole from 256² images after a JPEG q90 re-encode
MIN_WATERMARK_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
ALLOWED_BIT_ERRORS_PER = 16  # a payload is found with at most one wrong bit in 16 (see watermark.py)


def payload_bits(payload: str) -> list[int]:
    """The bits of a payload: `0x` + hex digits, or text as UTF-8. ValueError when it is empty, is not
    hex after `0x`, or is longer than MAX_WATERMARK_BITS."""
    if payload[:2].lower() == "0x":
        try:
            data = bytes.fromhex(payload[2:])
        except ValueError:
            raise ValueError(f"{payload!r} starts with 0x but is not an even number of hex digits") from None
    else:
        data = payload.encode("utf-8")
    bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
    if not bits or len(bits) > MAX_WATERMARK_BITS:
        raise ValueError(
            f"the payload must be 1 to {MAX_WATERMARK_BITS} bits (8 bytes of text, or 0x and 16 hex "
            f"digits), got {len(bits)}"
        )
    return bits


def watermark_size_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot carry the watermark, or None when it can."""
    if width * height < MIN_WATERMARK_PIXELS:
        return f"needs images of at least {MIN_WATERMARK_PIXELS} pixels (256x256), got {width}x{height}"
    return None
