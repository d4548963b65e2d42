"""`imagemill verify FOLDER` says only what it knows: each file's claims by their strength (a valid
signed C2PA manifest / unsigned claims only / nothing), a low-entropy watermark payload refused (a
smooth image reads back constant bits), and one bad file is one line while the rest are still checked.

Signed files are tested in test_c2pa.py (they need a certificate chain); these need none."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from imagemill.cli.commands import main
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import build_spec
from imagemill.provenance.watermark import add_watermark

PAYLOAD = "0x1f2e3d4c5b6a"


def _smooth() -> np.ndarray:
    """A never-watermarked 512² gradient: the watermark decoder reads constant bits from it."""
    yy, xx = np.mgrid[0:512, 0:512] / 512
    return (np.stack([xx, yy, (xx + yy) / 2], -1) * 255).astype(np.uint8)


def _textured() -> np.ndarray:
    noise = np.random.default_rng(3).random((64, 64, 3))
    return (np.kron(noise, np.ones((8, 8, 1))) * 200 + 20).astype(np.uint8)


def _png(pixels: np.ndarray, parameters: dict | None = None) -> bytes:
    chunks = PngImagePlugin.PngInfo()
    if parameters is not None:
        chunks.add_itxt("imagemill", json.dumps(parameters))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", pnginfo=chunks)
    return buffer.getvalue()


def _verify(capsys, *args: str) -> tuple[int, list[str]]:
    status = main(["verify", *args])
    return status, capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("payload", ["0x000000000000", "0xffffffffffff", "0x0000000000000001", "@"])
def test_a_low_entropy_payload_is_refused_by_the_spec_and_by_verify(payload, tmp_path, capsys):
    output = {"path": "/out", "watermark": {"payload": payload}}
    with pytest.raises(ImagemillError, match="low-entropy"):
        build_spec({"input": {"path": "/in"}, "output": output, "model": {"source": "/m"}})
    (tmp_path / "smooth.png").write_bytes(_png(_smooth()))
    assert main(["verify", str(tmp_path), "--watermark", payload]) == 2
    assert "low-entropy" in capsys.readouterr().err


def test_verify_reports_each_file_by_the_strength_of_its_claims(tmp_path, capsys):
    files = {
        "a-nothing.png": _png(_smooth()),
        "b-unsigned.png": _png(
            add_watermark(_textured(), PAYLOAD, "dwtDctSvd"), {"watermark": {"payload": PAYLOAD}}
        ),
        "c-zeros.png": _png(_smooth(), {"watermark": {"payload": "0x000000000000"}}),
        "d-forged.png": _png(_smooth(), {"watermark": {"payload": 12345, "method": "rot13"}}),
        "e-unknown-method.png": _png(_smooth(), {"watermark": {"payload": PAYLOAD, "method": "rot13"}}),
        "f-parameters.png": _png(_smooth(), {"prompt": "a red circle", "c2pa": False}),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    status, lines = _verify(capsys, str(tmp_path))
    by_file = dict(line.split(": ", 1) for line in lines[:-1])
    assert list(by_file) == [
        f"NOTHING {tmp_path}/a-nothing.png",
        f"UNSIGNED {tmp_path}/b-unsigned.png",
        f"FAILED {tmp_path}/c-zeros.png",
        f"FAILED {tmp_path}/d-forged.png",
        f"FAILED {tmp_path}/e-unknown-method.png",
        f"UNSIGNED {tmp_path}/f-parameters.png",
    ]
    values = list(by_file.values())
    assert values[0] == "no parameters, C2PA manifest or watermark: nothing to verify"
    assert values[1].startswith("unsigned claims only, not verified: parameters, watermark found")
    assert "low-entropy" in values[2] and "watermark found" not in values[2]
    assert "payload: Input should be a valid string" in values[3]
    assert "method: Input should be 'dwtDctSvd' or 'dwtDct'" in values[4]
    assert values[5] == "unsigned claims only, not verified: parameters"
    assert lines[-1] == (
        "6 images: 0 signed (valid C2PA manifest), 2 with unsigned claims only, 1 with nothing to verify, "
        "3 failed; watermark found in 1 of 1 checked"
    )
    assert status == 1


def test_a_folder_without_signed_files_does_not_pass(tmp_path, capsys):
    (tmp_path / "plain.png").write_bytes(_png(_smooth()))
    assert _verify(capsys, str(tmp_path))[0] == 3
    (tmp_path / "marked.png").write_bytes(_png(add_watermark(_textured(), PAYLOAD, "dwtDctSvd")))
    status, lines = _verify(capsys, str(tmp_path / "marked.png"), "--watermark", PAYLOAD)
    assert status == 3 and lines[0].startswith(f"UNSIGNED {tmp_path}/marked.png: ")
    status, lines = _verify(capsys, str(tmp_path / "plain.png"), "--watermark", PAYLOAD)
    assert status == 1 and lines[0].startswith(f"FAILED {tmp_path}/plain.png: watermark not found")


def test_an_unreadable_file_is_one_line_and_the_rest_are_checked(tmp_path, capsys):
    (tmp_path / "a-eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (tmp_path / "b-broken.tar").write_bytes(b"not a tar at all" * 40)
    (tmp_path / "c-ok.png").write_bytes(_png(_smooth(), {"prompt": "p"}))
    status, lines = _verify(capsys, str(tmp_path))
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [
        f"FAILED {tmp_path}/a-eps.png",
        f"FAILED {tmp_path}/b-broken.tar",
        f"UNSIGNED {tmp_path}/c-ok.png",
    ]
    assert "not an image in a supported format" in lines[0]
    assert lines[-1].startswith("3 images: ") and status == 1
