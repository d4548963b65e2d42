"""input.carry_columns: input columns copied, typed, into every output format, and read back by the
libraries a training script uses. The shards run in-process (the ShardWorker without Ray): carrying
columns needs no cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_metadata
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import imagemill
from imagemill.core.carry import RESERVED_NAMES
from imagemill.core.errors import ImagemillError
from imagemill.planning.shards import plan_shards
from imagemill.workers.worker import ShardWorker

SIZE = 32
IMAGES = 2  # images per prompt: each input row's columns go to both of its images
TYPES = {"label": pa.int64(), "class_name": pa.string(), "tags": pa.list_(pa.string())}


def _input_rows(file: int) -> list[dict]:
    """Four rows of file `file`: labels, some null (not the first rows: see the webdataset test)."""
    rows = []
    for k in range(4):
        n = file * 4 + k
        rows.append(
            {
                "id": f"row-{n:03d}",
                "prompt": f"a {['red', 'blue'][n % 2]} circle",
                "label": None if n in (6, 9) else n % 3,
                "class_name": None if n == 10 else f"class-{n % 3}",
                "tags": [f"t{n}", "shape"] if n != 7 else None,
                "unused": n * 10,
            }
        )
    return rows


def _write_input(folder: Path, n_files: int = 3) -> dict[str, dict]:
    """Input files of 4 rows in 2 row groups; the last file's columns come in another order."""
    folder.mkdir(exist_ok=True)
    expected = {}
    for file in range(n_files):
        rows = _input_rows(file)
        schema = pa.schema(
            [("id", pa.string()), ("prompt", pa.string()), *TYPES.items(), ("unused", pa.int64())]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        if file == n_files - 1:
            table = table.select(["tags", "prompt", "unused", "class_name", "id", "label"])
        pq.write_table(table, folder / f"part-{file}.parquet", row_group_size=2)
        expected.update({row["id"]: row for row in rows})
    return expected


def _spec(tmp_path: Path, output_format: str = "files", **input_settings) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4, **input_settings},
            "output": {"path": str(tmp_path / f"out-{output_format}"), "format": output_format},
            "model": {"kind": "noop"},
            "generation": {"width": SIZE, "height": SIZE, "images_per_prompt": IMAGES},
        }
    )


def _run_in_process(spec: imagemill.JobSpec) -> None:
    worker = ShardWorker(spec)
    worker.ready()
    for shard in plan_shards(spec.input).shards:
        worker.process_shard(shard)


def _image_ids(expected: dict[str, dict]) -> dict[str, dict]:
    """Image id → the input row it came from."""
    return {f"{row_id}_{k}": row for row_id, row in expected.items() for k in range(IMAGES)}


CARRIED = ["label", "class_name", "tags"]


@pytest.fixture
def outputs(tmp_path) -> tuple[dict[str, dict], dict[str, imagemill.JobSpec]]:
    expected = _write_input(tmp_path / "prompts")
    specs = {fmt: _spec(tmp_path, fmt, carry_columns=CARRIED) for fmt in ("files", "webdataset", "parquet")}
    for spec in specs.values():
        _run_in_process(spec)
    return _image_ids(expected), specs


def test_carried_columns_are_in_the_metadata_typed_after_the_fixed_columns(outputs):
    images, specs = outputs
    for spec in specs.values():
        table = read_metadata(spec.output.path)
        assert table.column_names[-3:] == CARRIED, "carried columns come after the fixed ones"
        assert {name: table.schema.field(name).type for name in CARRIED} == TYPES
        assert "unused" not in table.column_names
        for record in table.to_pylist():
            source = images[record["id"]]
            assert {name: record[name] for name in CARRIED} == {name: source[name] for name in CARRIED}
    nulls = read_metadata(specs["files"].output.path).column("label").null_count
    assert nulls == 2 * IMAGES, "a null label stays null"


def test_webdataset_json_carries_the_columns_and_where_the_row_came_from(outputs, tmp_path):
    import datasets
    import webdataset

    images, specs = outputs
    out = Path(specs["webdataset"].output.path)
    tars = sorted(str(tar) for tar in (out / "webdataset").glob("*.tar"))
    metadata = {row["id"]: row for row in read_metadata(str(out)).to_pylist()}
    samples = list(webdataset.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == len(images)
    for sample in samples:
        info = sample["json"]
        source, row = images[info["id"]], metadata[info["id"]]
        assert {name: info[name] for name in CARRIED} == {name: source[name] for name in CARRIED}
        assert (info["key"], info["input_file"], info["input_row"]) == (
            sample["__key__"],
            row["input_file"].rsplit("/", 1)[1],  # published: the file's name, not its folder
            row["input_row"],
        )

    dataset = datasets.load_dataset(
        "webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "hf")
    )
    by_id = {record["json"]["id"]: record["json"] for record in dataset}
    assert {row_id: by_id[row_id]["label"] for row_id in images} == {
        row_id: source["label"] for row_id, source in images.items()
    }
    assert by_id["row-000_1"]["tags"] == ["t0", "shape"] and by_id["row-007_0"]["tags"] is None


def test_parquet_format_rows_carry_the_columns_for_datasets_and_ray_data(outputs, tmp_path, ray_session):
    import datasets

    images, specs = outputs
    files = sorted(str(f) for f in (Path(specs["parquet"].output.path) / "data").glob("*.parquet"))
    dataset = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert dataset.features["label"] == datasets.Value("int64")
    assert dataset.features["class_name"] == datasets.Value("string")
    assert isinstance(dataset.features["image"], datasets.Image)
    for record in dataset:
        source = images[record["id"]]
        assert {name: record[name] for name in CARRIED} == {name: source[name] for name in CARRIED}

    expected = {row_id: s["label"] for row_id, s in images.items()}
    data = ray_session.data.read_parquet(files)
    assert data.schema().names[-3:] == CARRIED
    assert {row["id"]: row["label"] for row in data.take_all()} == expected
    metadata = ray_session.data.read_parquet(str(Path(specs["files"].output.path) / "metadata"))
    assert {row["id"]: row["label"] for row in metadata.take_all()} == expected


def test_star_carries_every_column_the_job_does_not_use(tmp_path):
    expected = _write_input(tmp_path / "prompts", n_files=2)
    spec = _spec(tmp_path, carry_columns="*")
    assert spec.label_column() == "label"
    _run_in_process(spec)
    table = read_metadata(spec.output.path)
    assert table.column_names[-4:] == ["class_name", "label", "tags", "unused"]
    assert table.column("unused").to_pylist() == [
        row["unused"] for row in expected.values() for _ in range(IMAGES)
    ]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"carry_columns": ["label", "seed"]}, ["'seed'", "clashes", "part-0.parquet"]),
        ({"carry_columns": ["key"]}, ["'key'", "clashes"]),
        ({"carry_columns": ["image"]}, ["'image'", "clashes"]),
        ({"carry_columns": ["prompt"]}, ["'prompt'", "prompt or id column"]),
        ({"carry_columns": ["id"]}, ["'id'", "prompt or id column"]),
        ({"carry_columns": ["label", "split"]}, ["'split'", "missing from", "part-0.parquet"]),
    ],
)
def test_unusable_carried_columns_are_refused_in_one_line(tmp_path, settings, words):
    _write_input(tmp_path / "prompts", n_files=1)
    with pytest.raises(ImagemillError) as refused:
        plan_shards(_spec(tmp_path, **settings).input)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize(
    ("label", "columns", "words"),
    [
        (pa.array(["a string label"]), ["label"], ["'label'", "int64", "string", "part-0", "part-9"]),
        (pa.array([1]), "*", ["'tags'", "missing from", "part-9"]),  # "*": what any file carries
    ],
)
def test_a_column_missing_from_one_file_or_typed_apart_is_refused_naming_the_file(
    tmp_path, label, columns, words
):
    _write_input(tmp_path / "prompts", n_files=2)
    other = pa.table({"id": ["x"], "prompt": ["p"], "label": label, "class_name": ["c"], "unused": [1]})
    pq.write_table(other, tmp_path / "prompts" / "part-9.parquet")
    with pytest.raises(ImagemillError) as refused:
        plan_shards(_spec(tmp_path, carry_columns=columns).input)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_carried_columns_and_the_label_are_in_the_fingerprint(tmp_path):
    plain = _spec(tmp_path)
    assert plain.fingerprint()["input"]["carry_columns"] == []
    assert plain.label_column() is None
    carried = _spec(tmp_path, carry_columns=["label"])
    assert carried.fingerprint()["input"]["carry_columns"] == ["label"] and carried.label_column() == "label"
    named = _spec(tmp_path, carry_columns=["class_name"], label_column="class_name")
    assert named.label_column() == "class_name" and named.fingerprint() != carried.fingerprint()
    with pytest.raises(ImagemillError, match="label_column 'label' is not carried"):
        _spec(tmp_path, carry_columns=["class_name"], label_column="label")


def _write_columns(tmp_path: Path, extra: dict[str, list]) -> None:
    """One input file of the job's own columns plus `extra` (any names, duplicates by case included)."""
    folder = tmp_path / "prompts"
    folder.mkdir(exist_ok=True)
    names = ["id", "prompt", *extra]
    arrays = [pa.array(["row-0"]), pa.array(["a circle"]), *(pa.array(v) for v in extra.values())]
    pq.write_table(pa.Table.from_arrays(arrays, names=names), folder / "part-0.parquet")


def _refusal(tmp_path: Path, columns) -> str:
    with pytest.raises(ImagemillError) as refused:
        plan_shards(_spec(tmp_path, carry_columns=columns).input)
    message = str(refused.value)
    assert "\n" not in message and "part-0.parquet" in message, message
    return message


@pytest.mark.parametrize("columns", [["label", "Label"], "*"])
def test_carried_names_that_differ_only_in_case_are_refused_naming_both(tmp_path, columns):
    _write_columns(tmp_path, {"label": [1], "Label": [2]})
    message = _refusal(tmp_path, columns)
    assert "'label'" in message and "'Label'" in message and "case" in message, message


@pytest.mark.parametrize("columns", [[""], "*"])
def test_a_carried_column_with_an_empty_name_is_refused(tmp_path, columns):
    _write_columns(tmp_path, {"": [1], "label": [2]})
    assert "empty name" in _refusal(tmp_path, columns)


# Output columns (the metadata's, the parquet format's `image`) in another case than the output's own.
CASE_CLASHES = ["ID", "Prompt", "SEED", "Status", "Image", "Key"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=st.sampled_from(sorted(RESERVED_NAMES)), data=st.data())
def test_a_listed_name_that_is_an_output_column_in_another_case_is_refused(tmp_path, output, data):
    upper = data.draw(st.lists(st.booleans(), min_size=len(output), max_size=len(output)))
    name = "".join(ch.upper() if up else ch for ch, up in zip(output, upper, strict=True))
    assume(name != output)
    _write_columns(tmp_path, {name: ["x"], "label": [1]})
    message = _refusal(tmp_path, ["label", name])
    assert f"'{name}'" in message and f"'{output}'" in message and "clashes" in message, message


def test_star_skips_columns_that_are_output_columns_in_another_case(tmp_path):
    _write_columns(tmp_path, {**{name: ["x"] for name in CASE_CLASHES}, "label": [1]})
    spec = _spec(tmp_path, carry_columns="*")
    _run_in_process(spec)
    table = read_metadata(spec.output.path)
    assert table.column_names[-1] == "label"
    folded = [name.casefold() for name in table.column_names]
    assert len(folded) == len(set(folded)), "no two metadata columns differ only in case"
