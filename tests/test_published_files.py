"""`output.embed_parameters`: what published files say about where a job's data and model live.

A job reads its prompts from a bucket with a distinctive name and loads its model from a local folder
with a distinctive path (spaces and non-ASCII in it), and writes every format. Every published file
(images and their decoded metadata, tar members, `data/` Parquet columns and schema) is walked: under
the default, `public`, no bucket, folder or path of the input or the model is in any of them, while the
metadata Parquet, the private record, keeps them all; `full` embeds them; `none` embeds nothing and
`verify` says so. The jobs run in process (testing.in_process: the real driver and ShardWorker).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_bucket, prompt_table, read_metadata
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.images import encode_image
from imagemill.core.records import MetadataRow
from imagemill.core.schedulers import a1111_sampler
from imagemill.provenance.parameters import EXIF_IFD, USER_COMMENT, ModelFacts
from imagemill.provenance.publication import Publication, file_name
from imagemill.provenance.verify import NOT_VERIFIED_EXIT_STATUS, Strength, verify
from imagemill.testing.in_process import run_in_process

BUCKET = "acme-secret-bkt-7q"
INPUT_FOLDER = "prompts-dir-x9"  # the input files' folder in the bucket
MODEL_FOLDERS = ("home-alice Privé", "client-zeta-model")  # where the model lives, under tmp_path
PRIVATE_RECORDS = ("metadata", "shards", "_job.json", "_lease.json", "_SUCCESS")
# A1111's own parameter pattern (modules/infotext_utils.py: re_param_code)
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    """The A1111 infotext: prompt lines, `Negative prompt:` lines, then the `Key: value, ...` line."""
    *lines, last = text.split("\n")
    prompt = [line for line in lines if not line.startswith("Negative prompt:")]
    pairs = {
        key: json.loads(value) if value.startswith('"') else value for key, value in A1111_PAIR.findall(last)
    }
    return {"prompt": "\n".join(prompt), **pairs}


def _image_texts(data: bytes) -> list[str]:
    """Every text an image file carries, decoded: PNG text chunks, EXIF (UserComment is UTF-16, which a
    byte search would miss), XMP."""
    image = Image.open(io.BytesIO(data))
    texts = [
        value.decode("latin-1") if isinstance(value, bytes) else str(value) for value in image.info.values()
    ]
    exif = image.getexif()
    texts += [str(value) for value in exif.values()]
    comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if comment:
        texts.append(comment[8:].decode("utf-16-be" if exif.endian == ">" else "utf-16-le"))
    return texts


def published_texts(output: Path) -> dict[str, list[str]]:
    """Every published file of a local output, by path: its raw bytes (as Latin-1), and for images,
    tars and `data/` Parquet files what they hold, decoded."""
    found: dict[str, list[str]] = {}
    for path in sorted(output.rglob("*")):
        relative = path.relative_to(output).as_posix()
        if not path.is_file() or relative.startswith(PRIVATE_RECORDS):
            continue
        data = path.read_bytes()
        texts = [data.decode("latin-1")]
        if path.suffix in (".png", ".jpg", ".webp"):
            texts += _image_texts(data)
        elif path.suffix == ".tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    content = tar.extractfile(member).read()
                    texts.append(member.name)
                    texts += _image_texts(content) if member.name.endswith(".png") else [content.decode()]
        elif path.suffix == ".parquet":
            table = pq.read_table(io.BytesIO(data))
            texts.append(json.dumps({k.decode(): v.decode() for k, v in table.schema.metadata.items()}))
            for record in table.to_pylist():
                image = record.pop("image")
                texts += [json.dumps(record, ensure_ascii=False), *_image_texts(image["bytes"])]
        found[relative] = texts
    return found


def _leaks(texts: dict[str, list[str]], private: list[str]) -> dict[str, list[str]]:
    """The private strings each file holds, as they are or JSON-escaped (EXIF's JSON is ASCII)."""
    forms = {p: {p, json.dumps(p)[1:-1], json.dumps(p, ensure_ascii=False)[1:-1]} for p in private}
    return {
        name: hits
        for name, found in texts.items()
        if (hits := [p for p in private if any(form in t for form in forms[p] for t in found)])
    }


@pytest.fixture(scope="module")
def private_job(s3_endpoint, tiny_model, tmp_path_factory):
    """The input in a bucket (one file with ids, one without: ids are then made from the file), the
    model in a local folder; returns a function that runs the job into a fresh local output."""
    root = tmp_path_factory.mktemp("published")
    model = root.joinpath(*MODEL_FOLDERS)
    shutil.copytree(tiny_model, model)
    bucket = make_bucket(BUCKET)
    fs = fsspec.filesystem("s3")
    for name, with_ids in (("night-a.parquet", True), ("night-b.parquet", False)):
        with fs.open(f"{bucket}/{INPUT_FOLDER}/{name}", "wb") as f:
            pq.write_table(prompt_table(3, with_ids=with_ids), f)

    def run(name: str, **output) -> tuple[Path, imagemill.JobSpec]:
        spec = imagemill.build_spec(
            {
                "input": {"path": f"{bucket}/{INPUT_FOLDER}", "rows_per_shard": 3},
                "output": {"path": str(root / "out" / name), **output},
                "model": {
                    "source": str(model),
                    "scheduler": {
                        "name": "DPMSolverMultistepScheduler",
                        "config": {"use_karras_sigmas": True},
                    },
                },
                "generation": {"width": 32, "height": 32, "num_inference_steps": 2, "seed": 5},
                "workers": {"batch_size": 3},
            }
        )
        assert run_in_process(spec).ok == 6
        return Path(spec.output.path), spec

    return run, model, root


FORMATS = [("files", "png"), ("files", "jpeg"), ("files", "webp"), ("webdataset", "png"), ("parquet", "webp")]


@pytest.mark.parametrize(("output_format", "image_format"), FORMATS)
def test_no_published_file_names_the_bucket_or_a_local_path_by_default(
    private_job, output_format, image_format
):
    run, model, root = private_job
    output, spec = run(
        f"public-{output_format}-{image_format}", format=output_format, image_format=image_format
    )
    texts = published_texts(output)
    assert any(name.startswith(("images/", "webdataset/", "data/")) for name in texts)
    private = [BUCKET, INPUT_FOLDER, str(model), *MODEL_FOLDERS, str(root)]
    assert _leaks(texts, private) == {}
    # the private record keeps every location
    rows = read_metadata(str(output)).to_pylist()
    assert {row["model"] for row in rows} == {str(model)}
    assert all(row["input_file"].startswith(f"s3://{BUCKET}/{INPUT_FOLDER}/") for row in rows)
    # the published record names the input file and the model by hash, and the sampler as A1111 does
    if (output_format, image_format) == ("files", "png"):
        for row in rows:
            image = Image.open(output / row["path"])
            parameters, record = parse_a1111(image.info["parameters"]), json.loads(image.info["imagemill"])
            assert parameters["Sampler"] == "DPM++ 2M Karras" and parameters["Steps"] == "2"
            assert parameters["Model hash"] == record["model_hash"][:10] and "Model" not in parameters
            assert record["model"] == f"sha256:{record['model_hash']}"
            assert record["input_file"] == row["input_file"].rsplit("/", 1)[1]
            assert parameters["Seed"] == str(row["seed"]) and parameters["prompt"] == row["prompt"]


def test_full_embeds_the_locations_and_none_embeds_nothing(private_job):
    run, model, _ = private_job
    output, _ = run("full", format="webdataset", embed_parameters="full")
    tars = {name: texts for name, texts in published_texts(output).items() if name.startswith("webdataset/")}
    assert len(tars) == 2 and set(_leaks(tars, [f"s3://{BUCKET}/{INPUT_FOLDER}/", str(model)])) == set(tars)

    output, _ = run("none", embed_parameters="none")
    for path in (output / "images").rglob("*.png"):
        info = Image.open(path).info
        assert not {"parameters", "imagemill", "XML:com.adobe.xmp"} & set(info), path
    report = verify([str(output)])
    assert {check.strength for check in report.checks} == {Strength.NOTHING}
    assert len(report.checks) == 6 and report.exit_status == NOT_VERIFIED_EXIT_STATUS


SAMPLERS = [
    ("DDIMScheduler", {}, "DDIM"),
    ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    ("EulerDiscreteScheduler", {}, "Euler"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, "DPM2 a Karras"),
    ("PNDMScheduler", {}, "PLMS"),
    ("UniPCMultistepScheduler", {}, "UniPC"),
]


@pytest.mark.parametrize(("name", "config", "expected"), SAMPLERS)
def test_the_a1111_text_names_the_sampler_as_a1111_does(name, config, expected):
    """From the real scheduler's config (defaults filled in), through the encoder, parsed back."""
    import diffusers

    scheduler = getattr(diffusers, name)(**config)
    sampler = a1111_sampler(type(scheduler).__name__, scheduler.config)
    facts = ModelFacts("cd" * 32, name, sampler, [], "imagemill 0.1.0", {})
    image = Image.open(io.BytesIO(_encoded(_row("s3://b/m", "s3://b/in/p.parquet"), facts)))
    assert parse_a1111(image.info["parameters"])["Sampler"] == expected


def _row(model: str, input_file: str, source_image: str | None = None) -> MetadataRow:
    return MetadataRow(
        id="r1", prompt="a red circle", prompt_truncated=False, negative_prompt=None, seed=1,
        num_inference_steps=2, guidance_scale=3.0, width=32, height=32, status="ok", model=model,
        input_file=input_file, input_row=0, source_image=source_image,
    )  # fmt: skip


def _encoded(row: MetadataRow, facts: ModelFacts) -> bytes:
    options = Publication.of("public", row.model, facts).embedded(row, "png")
    return encode_image(np.zeros((32, 32, 3), "uint8"), "png", 90, **options)


TEXT = st.text(st.characters(blacklist_characters="/?#\x00", blacklist_categories=("Cs",)), max_size=10)
# A private folder is marked (Q…Z9) so that finding it cannot be chance; `..`, `.`, `%2F` and a blank
# folder are there for what they do to the path, not to be searched for.
PRIVATE = TEXT.map(lambda text: f"Q{text}Z9")
FOLDERS = st.lists(st.one_of(PRIVATE, st.sampled_from(["..", ".", "%2F", " "])), min_size=1, max_size=4)
LOCATIONS = st.sampled_from(
    [
        "s3://{bucket}/{folders}/{name}",
        "gs://{bucket}/{folders}/{name}?X-Goog-Signature={bucket}",
        "/{folders}/{name}",
    ]
)


@given(
    bucket=st.from_regex(r"bkt-[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]", fullmatch=True),
    folders=FOLDERS,
    name=TEXT.filter(bool),
    layout=LOCATIONS,
    model_layout=LOCATIONS,
)
def test_a_published_record_holds_no_folder_or_bucket_whatever_the_names(
    bucket, folders, name, layout, model_layout
):
    """Odd names (spaces, `..`, `%2F`, a signed URL's query, non-ASCII, a bucket that looks like a
    domain): the published JSON, A1111 text and XMP keep the file's name and nothing above it."""
    private = [bucket, *(folder for folder in folders if folder.startswith("Q"))]
    assume(not any(part in name for part in private))
    location = layout.format(bucket=bucket, folders="/".join(folders), name=name)
    model = model_layout.format(bucket=bucket, folders="/".join(folders), name=name)
    facts = ModelFacts("ef" * 32, None, None, [{"source": model, "weight_name": name, "scale": 1.0}], "x", {})
    image = Image.open(io.BytesIO(_encoded(_row(model, location, source_image=location), facts)))
    published = json.loads(image.info["imagemill"])
    assert published["input_file"] == published["source_image"] == file_name(location) == name
    assert published["model"] == f"sha256:{'ef' * 32}"
    assert published["loras"] == [{"source": None, "weight_name": name, "scale": 1.0}]
    for text in (image.info["imagemill"], image.info["parameters"], image.info["XML:com.adobe.xmp"]):
        forms = {form for part in private for form in (part, json.dumps(part)[1:-1], escape(part))}
        assert not [form for form in forms if form in text]


def test_a_hub_id_is_a_public_name_and_a_local_folder_of_that_name_is_not(tmp_path, monkeypatch):
    facts = ModelFacts("01" * 32, None, None, [], "x", {})
    assert Publication.of("public", "stabilityai/sdxl-turbo", facts).model == "stabilityai/sdxl-turbo"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "secret").mkdir(parents=True)
    assert Publication.of("public", "acme/secret", facts).model == f"sha256:{'01' * 32}"
    assert Publication.of("full", "acme/secret", facts).model == "acme/secret"
