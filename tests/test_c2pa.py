"""C2PA manifests: signed on the actor with a certificate made here, validated by c2pa-python's Reader
and by `imagemill verify`, which reports a tampered image; the parameters and watermark of the same
files, read back through the shard worker (in-process: the actor class Ray runs, without Ray)."""

from __future__ import annotations

import datetime
import io
import json
import subprocess

import c2pa
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, PngImagePlugin

import imagemill
from imagemill.cli.commands import main
from imagemill.core.errors import ImagemillError
from imagemill.planning.shards import plan_shards
from imagemill.provenance.c2pa_signing import PARAMETERS_LABEL
from imagemill.provenance.verify import verify
from imagemill.workers.worker import ShardWorker
from tests.conftest import read_metadata
from tests.doc_pages import section, shell_commands

PROMPTS = ["a grey square\nsecond line, with: colons", "猫 🙂 ünïcode", "a plain prompt"]
SEEDS = [0x7F7F7F, 0x606A70, 0x909088]  # the noop model's colours: mid-tones, room for the watermark


def _certificate(name: str, issuer: x509.Name, public_key, signing_key, ca: bool) -> x509.Certificate:
    """A version-3 certificate with the extensions C2PA's certificate profile asks for: key usage,
    basic constraints, subject and authority key ids, and for the signer an allowed extended key usage."""
    now = datetime.datetime.now(datetime.UTC)
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
        + ("encipher_only", "decipher_only"),
        False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def signing_files(tmp_path_factory):
    """An ES256 chain (signer, then its root CA) and the signer's key, as PEM files."""
    folder = tmp_path_factory.mktemp("c2pa")
    root_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagemill test root")])
    root = _certificate("imagemill test root", root_name, root_key.public_key(), root_key, ca=True)
    signer = _certificate("imagemill test signer", root_name, signer_key.public_key(), root_key, ca=False)
    chain = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in (signer, root))
    (folder / "chain.pem").write_bytes(chain)
    key = signer_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "key.pem").write_bytes(key)
    return folder / "chain.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def signed_output(tmp_path_factory, signing_files):
    """Three 256² PNGs written by the shard worker with parameters, watermark and C2PA."""
    folder = tmp_path_factory.mktemp("signed")
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "prompt": PROMPTS, "seed": SEEDS}), folder / "prompts.parquet"
    )
    cert, key = signing_files
    spec = imagemill.build_spec(
        {
            "input": {"path": str(folder / "prompts.parquet")},
            "output": {
                "path": str(folder / "out"),
                "watermark": {"payload": "0x1f2e3d4c5b6a"},
                "c2pa": {"cert": str(cert), "key": str(key)},
            },
            "model": {"kind": "noop"},
            "generation": {"width": 256, "height": 256, "negative_prompt": "blurry"},
        }
    )
    worker = ShardWorker(spec)
    assert worker.load_error is None
    for shard in plan_shards(spec.input).shards:
        assert worker.process_shard(shard).ok == 3
    return folder / "out", spec


def _images(output) -> list:
    return sorted((output / "images").rglob("*.png"))


def test_c2pa_reader_validates_every_manifest_with_the_ai_assertion_and_parameters(signed_output):
    output, _ = signed_output
    metadata = {row["id"]: row for row in read_metadata(str(output)).to_pylist()}
    for path in _images(output):
        with c2pa.Reader("image/png", io.BytesIO(path.read_bytes())) as reader:
            assert reader.get_validation_state() in ("Valid", "Trusted")
            manifest = reader.get_active_manifest()
        assertions = {assertion["label"]: assertion["data"] for assertion in manifest["assertions"]}
        (action,) = next(data for label, data in assertions.items() if label.startswith("c2pa.actions"))[
            "actions"
        ]
        assert action["action"] == "c2pa.created"
        assert action["digitalSourceType"].endswith("/trainedAlgorithmicMedia")
        parameters = assertions[PARAMETERS_LABEL]
        row = metadata[parameters["id"]]
        for name in ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "model"):
            assert parameters[name] == row[name], name


def test_the_files_carry_the_metadata_rows_parameters(signed_output):
    output, _ = signed_output
    for row in read_metadata(str(output)).to_pylist():
        data = (output / row["path"]).read_bytes()
        embedded = json.loads(Image.open(io.BytesIO(data)).info["imagemill"])
        assert {name: embedded[name] for name in ("id", "prompt", "seed", "width", "height")} == {
            name: row[name] for name in ("id", "prompt", "seed", "width", "height")
        }
        assert embedded["c2pa"] is True and embedded["watermark"]["payload"] == "0x1f2e3d4c5b6a"


def test_verify_passes_the_output_and_reports_a_tampered_image(signed_output, tmp_path, capsys):
    output, _ = signed_output
    assert main(["verify", str(output)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [f"SIGNED {path}" for path in _images(output)]
    for line in lines[:-1]:
        assert line.split(": ", 1)[1].startswith(
            "C2PA manifest valid; signed claims: parameters, watermark found"
        )
    assert lines[-1] == (
        "3 images: 3 signed (valid C2PA manifest), 0 with unsigned claims only, 0 with nothing to verify, "
        "0 failed; watermark found in 3 of 3 checked"
    )
    copies = []
    for path in _images(output):
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    tampered = bytearray(copies[1].read_bytes())
    end = tampered.rindex(b"IEND")
    tampered[end - 40] ^= 0x01  # one bit of the image data
    copies[1].write_bytes(bytes(tampered))
    assert main(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4, lines
    (failed,) = [line for line in lines if line.startswith("FAILED")]
    assert failed.startswith(f"FAILED {copies[1]}: ") and "C2PA manifest does not validate" in failed
    assert lines[-1].startswith("3 images: 2 signed (valid C2PA manifest), ") and ", 1 failed;" in lines[-1]


def test_a_stripped_manifest_is_reported_where_the_parameters_say_it_was_signed(signed_output, tmp_path):
    output, _ = signed_output
    image = Image.open(_images(output)[0])
    info = image.info["imagemill"]
    chunks = PngImagePlugin.PngInfo()
    chunks.add_itxt("imagemill", info)
    image.save(tmp_path / "resaved.png", pnginfo=chunks)  # a re-encode drops the manifest
    (check,) = verify([str(tmp_path)]).checks
    assert check.problems[0] == "no C2PA manifest, though its parameters say it was signed"


def test_key_and_certificate_stay_out_of_records(signed_output, signing_files):
    _, spec = signed_output
    recorded = json.dumps([spec.redacted(), spec.fingerprint()])
    for path in signing_files:
        assert str(path) not in recorded and path.read_text()[30:60] not in recorded
    assert spec.fingerprint()["output"]["c2pa"] == {"alg": "es256"}


def test_a_key_that_does_not_read_is_one_line_naming_the_setting(tmp_path, signing_files):
    from imagemill.provenance.c2pa_signing import C2paSigner

    cert, _ = signing_files
    spec = imagemill.build_spec(
        {
            "input": {"path": "/in"},
            "output": {"path": "/out", "c2pa": {"cert": str(cert), "key": str(tmp_path / "secret-name.pem")}},
            "model": {"source": "/m"},
        }
    )
    with pytest.raises(ImagemillError) as error:
        C2paSigner(spec.output.c2pa)
    assert str(error.value).startswith("output.c2pa.key could not be read") and "secret-name" not in str(
        error.value
    )


def test_the_guides_openssl_commands_make_a_chain_that_signs_and_verifies(tmp_path, capsys):
    """docs/provenance.md's certificate commands, as written, run in a fresh folder; the chain and key
    they leave sign an image that `imagemill verify` reports as SIGNED."""
    commands = shell_commands(section("docs/provenance.md", "A certificate for C2PA"))
    assert commands and all(line.split()[0] in ("openssl", "printf", "cat") for line in commands)
    for line in commands:
        subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, capture_output=True)
    pq.write_table(
        pa.table({"id": ["a"], "prompt": ["a plain prompt"], "seed": SEEDS[:1]}), tmp_path / "p.parquet"
    )
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "p.parquet")},
            "output": {"path": str(tmp_path / "out"), "c2pa": {"cert": str(chain), "key": str(key)}},
            "model": {"kind": "noop"},
            "generation": {"width": 256, "height": 256},
        }
    )
    worker = ShardWorker(spec)
    assert worker.load_error is None
    for shard in plan_shards(spec.input).shards:
        assert worker.process_shard(shard).ok == 1
    assert main(["verify", str(tmp_path / "out")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("SIGNED ") and ": C2PA manifest valid; signed claims: parameters" in first


def test_with_embed_parameters_none_the_manifest_says_only_ai_generated_and_verify_says_signed(
    tmp_path, signing_files
):
    """`none`: no parameters in the file nor in its manifest; the manifest still validates, so `verify`
    reports the file as signed (its claim: AI-generated), not as carrying parameters."""
    pq.write_table(pa.table({"id": ["a"], "prompt": PROMPTS[:1]}), tmp_path / "prompts.parquet")
    cert, key = signing_files
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts.parquet")},
            "output": {
                "path": str(tmp_path / "out"),
                "embed_parameters": "none",
                "c2pa": {"cert": str(cert), "key": str(key)},
            },
            "model": {"kind": "noop"},
            "generation": {"width": 64, "height": 64},
        }
    )
    worker = ShardWorker(spec)
    (shard,) = plan_shards(spec.input).shards
    assert worker.process_shard(shard).ok == 1
    (path,) = _images(tmp_path / "out")
    assert "imagemill" not in Image.open(path).info
    with c2pa.Reader("image/png", io.BytesIO(path.read_bytes())) as reader:
        assert reader.get_validation_state() in ("Valid", "Trusted")
        labels = [assertion["label"] for assertion in reader.get_active_manifest()["assertions"]]
    assert PARAMETERS_LABEL not in labels and any(label.startswith("c2pa.actions") for label in labels)
    (check,) = verify([str(path)]).checks
    assert check.line().startswith("SIGNED") and check.parameters is None
