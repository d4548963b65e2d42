"""Output formats: each one written by a real job and read back by its own consumer library.

The jobs run in process (testing.in_process: the real driver and ShardWorker, no actors): what a format
writes is the worker's and the driver's doing, and the bytes are those a Ray run writes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import prompt_table, read_metadata
from PIL import Image

import imagemill
from imagemill.core.layout import OutputLayout, sample_key
from imagemill.core.records import MetadataRow
from imagemill.core.write_gate import OwnedOutput
from imagemill.provenance.parameters import ModelFacts
from imagemill.provenance.publication import Publication
from imagemill.testing.in_process import run_in_process
from imagemill.workers.writers import TarWriter

SIZE = 32
# Two input files of 6 rows, one shard each; "b.v2" puts a dot in a shard id, which WebDataset keys
# must not carry. Row 7 has no prompt: an error row, in the metadata but not among the images.
FILES = {"a": 0, "b.v2": 6}
SHARDS = ["a-rg00000-00002", "b.v2-rg00000-00002"]
ERROR_ID = "row-00007"
PUBLICATION = Publication.of("public", "tiny", ModelFacts(None, None, None, [], "imagemill", {}))


def _write_input(folder: Path) -> dict[str, str | None]:
    """The input files; returns {id: prompt}."""
    folder.mkdir()
    prompts = {}
    for name, start in FILES.items():
        table = prompt_table(6, start=start)
        if start <= 7 < start + 6:
            column = table.column("prompt").to_pylist()
            column[7 - start] = None
            table = table.set_column(1, "prompt", pa.array(column, pa.string()))
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=3)
        prompts.update(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), strict=True))
    return prompts


def _spec(tmp_path: Path, tiny_model: str, output_format: str | None) -> imagemill.JobSpec:
    output = {"path": str(tmp_path / "out")}
    if output_format:
        output["format"] = output_format
    return imagemill.build_spec(
        {
            "name": f"format-{output_format}",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 6},
            "output": output,
            "model": {"source": tiny_model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 1, "seed": 3},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )


def _run_and_check_metadata(spec: imagemill.JobSpec, prompts: dict[str, str | None]) -> dict[str, dict]:
    """Runs the job; checks the accounting and the error row; returns the ok rows' metadata by id."""
    result = run_in_process(spec)
    assert result.complete and result.shards_total == len(SHARDS)
    assert (result.ok, result.errors) == (len(prompts) - 1, 1)
    rows = {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}
    assert set(rows) == set(prompts)
    error = rows.pop(ERROR_ID)
    assert error["status"] == "error" and error["error"].startswith("invalid_prompt")
    assert error["path"] is None and error["sha256"] is None
    assert all(row["status"] == "ok" and row["prompt"] == prompts[row["id"]] for row in rows.values())
    assert not (Path(spec.output.path) / "images").exists()
    return rows


def _check_image(data: bytes, sha256: str) -> None:
    assert hashlib.sha256(data).hexdigest() == sha256
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (SIZE, SIZE)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*.*")}


def _check_resume_changes_nothing(spec: imagemill.JobSpec, folders: list[str]) -> None:
    out = Path(spec.output.path)
    before = {folder: _snapshot(out / folder) for folder in folders}
    again = run_in_process(spec)
    assert again.complete and again.shards_run == 0
    assert {folder: _snapshot(out / folder) for folder in folders} == before


def test_webdataset_tars_read_back_with_webdataset(tmp_path, tiny_model):
    import webdataset

    prompts = _write_input(tmp_path / "prompts")
    spec = _spec(tmp_path, tiny_model, "webdataset")
    rows = _run_and_check_metadata(spec, prompts)
    out = Path(spec.output.path)
    tars = sorted((out / "webdataset").glob("*.tar"))
    assert [tar.name for tar in tars] == [f"{shard}.tar" for shard in SHARDS]

    samples = list(webdataset.WebDataset([str(tar) for tar in tars], shardshuffle=False))
    keys = [sample["__key__"] for sample in samples]
    assert len(keys) == len(set(keys)) == len(rows), "keys must be unique across shards"
    assert all("." not in key for key in keys)
    assert sorted(keys) == sorted(row["key"] for row in rows.values())
    for sample in samples:
        info = json.loads(sample["json"])
        row = rows[info["id"]]
        assert row["key"] == sample["__key__"]
        assert row["path"] == str(Path(sample["__url__"]).relative_to(out))
        assert info["prompt"] == prompts[info["id"]] and info["sha256"] == row["sha256"]
        assert info["parameters"]["num_inference_steps"] == 1 and (info["width"], info["height"]) == (
            SIZE,
            SIZE,
        )
        _check_image(sample["png"], row["sha256"])

    decoded = next(iter(webdataset.WebDataset([str(tars[0])], shardshuffle=False).decode("pil")))
    assert isinstance(decoded["png"], Image.Image) and decoded["png"].size == (SIZE, SIZE)
    assert decoded["json"]["prompt"] == prompts[decoded["json"]["id"]]

    with tarfile.open(tars[1]) as tar:  # deterministic headers, rows in shard order
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == "" for m in members)
    assert [m.name for m in members][:2] == [
        f"{sample_key(SHARDS[1], 0)}.png",
        f"{sample_key(SHARDS[1], 0)}.json",
    ]

    _check_resume_changes_nothing(spec, ["webdataset", "metadata", "shards"])


def test_parquet_data_reads_back_with_datasets_and_ray_data(ray_session, tmp_path, tiny_model):
    import datasets

    prompts = _write_input(tmp_path / "prompts")
    spec = _spec(tmp_path, tiny_model, "parquet")
    rows = _run_and_check_metadata(spec, prompts)
    out = Path(spec.output.path)
    files = sorted((out / "data").glob("*.parquet"))
    assert [file.name for file in files] == [f"{shard}.parquet" for shard in SHARDS]
    assert {row["path"] for row in rows.values()} == {str(file.relative_to(out)) for file in files}
    assert "key" not in read_metadata(spec.output.path).column_names

    table = pq.read_table(files)  # only ok rows, the image bytes intact
    assert sorted(table.column("id").to_pylist()) == sorted(rows)
    for record in table.to_pylist():
        _check_image(record["image"]["bytes"], rows[record["id"]]["sha256"])

    dataset = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(dataset.features["image"], datasets.Image), "the image column must need no cast"
    assert sorted(dataset["id"]) == sorted(rows)
    for record in dataset:
        assert isinstance(record["image"], Image.Image) and record["image"].size == (SIZE, SIZE)
        assert record["prompt"] == prompts[record["id"]] and record["seed"] == rows[record["id"]]["seed"]

    data = ray_session.data.read_parquet([str(f) for f in files])
    assert data.count() == len(rows)
    first = data.take(1)[0]
    _check_image(first["image"]["bytes"], rows[first["id"]]["sha256"])

    _check_resume_changes_nothing(spec, ["data", "metadata", "shards"])


def test_files_is_the_default_format_and_the_format_is_part_of_the_fingerprint(tmp_path, tiny_model):
    default = _spec(tmp_path, tiny_model, None)
    assert default.output.format == "files"
    assert default.fingerprint() == _spec(tmp_path, tiny_model, "files").fingerprint()
    fingerprints = [_spec(tmp_path, tiny_model, f).fingerprint() for f in ("files", "webdataset", "parquet")]
    assert len({str(f) for f in fingerprints}) == 3


def test_sample_keys_have_no_dots_and_stay_distinct():
    assert sample_key("a-rg00000-00002", 7) == "a-rg00000-00002-000007"
    dotted, cleaned = sample_key("b.v2-rg00000-00002", 5), sample_key("b_v2-rg00000-00002", 5)
    assert "." not in dotted and dotted.endswith("-000005") and dotted != cleaned


def _tar_row(row_id: str, negative_prompt: str | None) -> MetadataRow:
    return MetadataRow(
        id=row_id, prompt=f"a prompt for {row_id}", prompt_truncated=False, negative_prompt=negative_prompt,
        seed=1, num_inference_steps=2, guidance_scale=3.0, width=SIZE, height=SIZE, status="ok",
        sha256="0" * 64, model="tiny", input_file="in.parquet", input_row=0,
    )  # fmt: skip


def test_webdataset_json_fields_keep_one_type_across_tars(tmp_path):
    """`datasets` infers a WebDataset's features from the first tar's samples: a negative prompt that
    no row of the first tar has and rows of a later tar have must still load, as a string throughout
    ("" for none; the metadata Parquet keeps the null)."""
    import datasets

    output = OutputLayout(str(tmp_path / "out"))
    png = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(png, format="PNG")
    tars = []
    for shard_id, negative in (("first", None), ("second", "blurry")):
        writer = TarWriter(OwnedOutput.unleased(output).attempt(shard_id), "png", PUBLICATION)
        rows = [(i, _tar_row(f"{shard_id}-{i}", negative), png.getvalue()) for i in range(3)]
        tars.append(tmp_path / f"{shard_id}.tar")
        tars[-1].write_bytes(writer.build(rows))

    dataset = datasets.load_dataset(
        "webdataset", data_files=[str(tar) for tar in tars], split="train", cache_dir=str(tmp_path / "hf")
    )
    records = {record["json"]["id"]: record["json"] for record in dataset}
    assert len(records) == 6
    assert records["first-0"]["parameters"]["negative_prompt"] == ""
    assert records["second-0"]["parameters"]["negative_prompt"] == "blurry"
    assert (
        records["first-0"]["expanded_prompt"] == ""
        and records["second-0"]["prompt"] == "a prompt for second-0"
    )
