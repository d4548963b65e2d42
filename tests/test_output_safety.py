"""Nothing of the user's is lost: where a job may write, what --overwrite deletes, records that survive.

Issue #13 points 1, 2, 4, 6 and 11, each through the Python API or the CLI, on local disk (and for
glob characters and buckets, on the S3 endpoint too). The jobs use the no-op generator: these tests are
about the output folder, not the images. Python API jobs run in process (testing.in_process: the real
driver and worker without actors): what they write and delete is the driver's and the worker's doing.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_bucket, run_cli, write_prompt_files

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.stamped import read_stamped, write_stamped
from imagemill.reporting.outcome import COMPLETE
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import run_in_process

ROWS = 8  # two shards of 4 rows
IMAGEMILL_MARKERS = {"_job.json", "_SUCCESS", "report.json", "report.html"}
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")
SHARD_STATS = re.compile(r"shards/.+-rg\d{5}-\d{5}\.json")


def _spec(
    input_path,
    output_path,
    output_format: str = "files",
    seed: int = 0,
    rows_per_shard: int = 4,
    **output_extra,
):
    return imagemill.build_spec(
        {
            "name": "safety",
            "input": {"path": str(input_path), "rows_per_shard": rows_per_shard},
            "output": {"path": str(output_path), "format": output_format, **output_extra},
            "model": {"kind": "noop"},
            "generation": {"width": 8, "height": 8, "seed": seed},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )


def _job_yaml(folder: Path, input_path, output_path) -> Path:
    job = folder / "job.yaml"
    job.write_text(
        f"name: safety\ninput: {{path: '{input_path}', rows_per_shard: 4}}\n"
        f"output: {{path: '{output_path}'}}\nmodel: {{kind: noop}}\n"
        "generation: {width: 8, height: 8}\nworkers: {num_workers: 1, batch_size: 4}\n"
    )
    return job


def _one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("imagemill: error: "), done.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr


def _prompts(tmp_path: Path) -> Path:
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=ROWS, row_group_size=4)
    return tmp_path / "prompts"


def _tree(url: str) -> dict[str, str]:
    """{path relative to url: sha256} of every file under url, listed literally (no glob)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {
        path[len(root) + 1 :]: hashlib.sha256(fs.cat_file(path)).hexdigest()
        for path in fs.find(root)
        if fs.isfile(path)
    }


def _metadata(url: str) -> pa.Table:
    """Every shard's metadata, read from exact paths (conftest's read_metadata globs the root)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    files = sorted(path for path in fs.ls(f"{root}/metadata", detail=False) if path.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(path, "rb")) for path in files])


def _imagemill_files(url: str) -> set[str]:
    """What a finished job's own records name: markers, each shard's stats and metadata, its images."""
    shard_ids = {Path(path).stem for path in _tree(url) if SHARD_STATS.fullmatch(path)}
    named = {path for path in _metadata(url).column("path").to_pylist() if path}
    return (
        IMAGEMILL_MARKERS
        | named
        | {f"shards/{shard_id}.json" for shard_id in shard_ids}
        | {f"metadata/{shard_id}.parquet" for shard_id in shard_ids}
    )


# --- point 1: --overwrite deletes the previous job's files and nothing else ------------------------


USER_FILES = {
    "notes.txt": b"my notes",
    "images/holiday.jpg": b"a photo",
    "data/table.csv": b"a,b\n1,2\n",
    "data/own.parquet": b"PAR1 not really",
    "metadata/README.md": b"about my metadata",
    "shards/notes.json": b'{"mine": true}',
    "report.md": b"my report",
}


def test_overwrite_deletes_the_previous_jobs_files_and_nothing_else(tmp_path):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out"
    for relative, data in USER_FILES.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    user = _tree(str(out))

    # A first run into a folder holding the user's files is refused, and writes nothing.
    refusal = r"already holds files imagemill did not write.*--allow-existing"
    with pytest.raises(ImagemillError, match=refusal):
        run_in_process(_spec(prompts, out))
    assert _tree(str(out)) == user

    assert run_in_process(_spec(prompts, out, allow_existing=True)).complete
    for output_format in ("parquet", "webdataset", "files"):
        result = run_in_process(_spec(prompts, out, output_format), overwrite=True)
        assert result.complete and result.shards_run == 2
        assert set(_tree(str(out))) == set(user) | _imagemill_files(str(out)), output_format
        assert {path: _tree(str(out))[path] for path in user} == user

    # A shard cut short (no stats file) leaves files its records do not name; they are imagemill's
    # because the shard id is one of the job's, and go too.
    shard_id = sorted(p.stem for p in (out / "shards").glob("*-rg*.json"))[0]
    (out / "shards" / f"{shard_id}.json").unlink()
    (out / "images" / shard_id / "row-99999.png").write_bytes(b"half an attempt")
    assert run_in_process(_spec(prompts, out, seed=1), overwrite=True).complete
    assert set(_tree(str(out))) == set(user) | _imagemill_files(str(out))
    assert not (out / "webdataset").exists(), "a folder left empty is removed"
    assert (out / "data").is_dir() and (out / "images" / "holiday.jpg").read_bytes() == b"a photo"


@pytest.mark.cli
def test_a_first_run_into_a_folder_with_other_files_is_refused_in_one_line(tmp_path):
    prompts = _prompts(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photo.jpg").write_bytes(b"mine")

    done = run_cli("run", str(_job_yaml(tmp_path, prompts, tmp_path / "out")), "--no-progress")

    _one_line_error(done, "photo.jpg")
    assert "--allow-existing" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.jpg"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("{root}", "the root folder"),
        ("{root}.", "the root folder"),
        ("~", "the home folder"),
        ("~/.", "the home folder"),
        ("{home}/", "the home folder"),
        ("", "output.path: Value error"),
        ("   ", "output.path: Value error"),
        ("{prompts}", "the input folder"),
        ("{prompts}/./sub/..", "the input folder"),
    ],
)
def test_outputs_that_would_mix_with_other_files_are_refused(tmp_path, monkeypatch, output, expected):
    """The root folder, the home folder, an empty path and the input folder are never an output."""
    prompts = _prompts(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # an empty path used to become the working directory
    path = output.format(root="/", home=home, prompts=prompts)
    before = _tree(str(tmp_path))

    with pytest.raises(ImagemillError, match=expected):
        run_in_process(_spec(prompts, path))
    assert _tree(str(tmp_path)) == before


@pytest.mark.cli
def test_the_cli_refuses_an_empty_or_root_output_in_one_line(tmp_path):
    prompts = _prompts(tmp_path)
    job = str(_job_yaml(tmp_path, prompts, tmp_path / "unused"))
    _one_line_error(run_cli("run", job, "--output", "", cwd=tmp_path), "output.path")
    _one_line_error(run_cli("run", job, "--output", "/", cwd=tmp_path), "the root folder")
    assert not (tmp_path / "_job.json").exists()


# --- point 4: an output inside the input ------------------------------------------------------------


@pytest.mark.cli
def test_an_output_inside_the_input_folder_is_refused_in_one_line(tmp_path):
    prompts = _prompts(tmp_path)
    done = run_cli("run", str(_job_yaml(tmp_path, prompts, prompts / "out")), "--no-progress")
    _one_line_error(done, "inside the input folder")
    assert not (prompts / "out").exists()


def test_an_input_glob_that_would_match_the_output_is_refused(tmp_path):
    prompts = _prompts(tmp_path)
    with pytest.raises(ImagemillError, match=r"input glob .* matches files the job writes"):
        run_in_process(_spec(f"{prompts}/**/*.parquet", prompts / "out"))
    assert not (prompts / "out").exists()
    with pytest.raises(ImagemillError, match="is the input file"):
        run_in_process(_spec(prompts / "part-000.parquet", prompts / "part-000.parquet"))

    # A glob that cannot reach the output is fine, and its re-runs never read the job's own files.
    for _ in range(2):
        result = run_in_process(_spec(f"{prompts}/*.parquet", prompts / "out"))
        assert result.complete and result.rows_total == ROWS
    assert _metadata(str(prompts / "out")).num_rows == ROWS


# --- point 2: glob characters in output paths -------------------------------------------------------


@pytest.mark.parametrize("store", ["local", "s3"])
def test_glob_characters_in_the_output_path_are_taken_literally(s3_endpoint, tmp_path, store):
    """`run[12]` is a folder named run[12]: its --overwrite, resume, report and status touch it alone."""
    prompts = _prompts(tmp_path)
    base = str(tmp_path) if store == "local" else f"{make_bucket(f'globs-{uuid.uuid4().hex[:8]}')}/e2e"
    neighbour, target = f"{base}/run1", f"{base}/run[12]"
    # One shard there, two here: a target that read the neighbour's records would not resume.
    assert run_in_process(_spec(prompts, neighbour, rows_per_shard=8)).complete
    untouched = _tree(neighbour)

    assert run_in_process(_spec(prompts, target)).complete
    again = run_in_process(_spec(prompts, target, seed=1), overwrite=True)
    assert again.complete and again.shards_run == 2
    resumed = run_in_process(_spec(prompts, target, seed=1))
    assert resumed.complete and resumed.shards_run == 0

    assert _tree(neighbour) == untouched
    assert set(_tree(target)) == _imagemill_files(target)
    assert set(_metadata(target).column("seed").to_pylist()).isdisjoint(
        _metadata(neighbour).column("seed").to_pylist()
    ), "the target holds its second job's images only"
    assert job_status(target).state == COMPLETE


# --- point 11: a missing output bucket ------------------------------------------------------------


def test_a_missing_output_bucket_is_named_and_never_created(ray_address, s3_endpoint, tmp_path):
    import s3fs

    prompts = _prompts(tmp_path)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    job = _job_yaml(tmp_path, prompts, f"s3://{bucket}/job")
    done = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    _one_line_error(done, f"output bucket '{bucket}' does not exist")
    assert not s3fs.S3FileSystem().exists(bucket)


# --- point 6: records that survive a full disk, and records that do not read ----------------------


FILE_TOO_BIG = """\
import resource, signal, sys
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
try:
    OwnedOutput.unleased(OutputLayout(sys.argv[1])).write_json("_job.json", {"name": "x" * 1000})
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_record_write_that_fails_half_way_leaves_the_previous_record(tmp_path):
    """A full disk during a record write: the old record stays whole, and no temporary file is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text(json.dumps({"name": "before"}))

    done = subprocess.run(
        [sys.executable, "-c", FILE_TOO_BIG, str(out)], capture_output=True, text=True, timeout=120
    )

    assert done.stdout.strip() == "OSError", done.stdout + done.stderr
    assert json.loads((out / "_job.json").read_text()) == {"name": "before"}
    assert sorted(p.name for p in out.iterdir()) == ["_job.json"]


DERIVED_FILE_TOO_BIG = """\
import resource, signal, sys
import pyarrow as pa
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.stamped import write_stamped
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
owned = OwnedOutput.unleased(OutputLayout(sys.argv[1]))
try:
    write_stamped(owned, "duplicates.parquet", pa.table({"a": range(10_000)}), {"n": 2})
except OSError as exc:
    print(type(exc).__name__)
"""


def test_the_evaluation_files_survive_a_full_disk_and_one_cut_short_is_made_again(tmp_path, caplog):
    """duplicates.parquet and the other derived files are reused by a re-run that has the same basis: a
    full disk during their write must leave the previous file whole, and a file that does not read
    (cut short before writes were whole) must be made again, not end every re-run in a Parquet error."""
    out = tmp_path / "out"
    out.mkdir()
    layout = OutputLayout(str(out))
    before = write_stamped(
        OwnedOutput.unleased(layout), "duplicates.parquet", pa.table({"a": [1, 2]}), {"n": 1}
    )

    done = subprocess.run(
        [sys.executable, "-c", DERIVED_FILE_TOO_BIG, str(out)], capture_output=True, text=True, timeout=120
    )

    assert done.stdout.strip() == "OSError", done.stdout + done.stderr
    assert read_stamped(layout, "duplicates.parquet", {"n": 1}) == before
    assert read_stamped(layout, "duplicates.parquet", {"n": 2}) is None
    assert sorted(p.name for p in out.iterdir()) == ["duplicates.parquet"]

    (out / "duplicates.parquet").write_bytes((out / "duplicates.parquet").read_bytes()[:100])
    assert read_stamped(layout, "duplicates.parquet", {"n": 1}) is None
    assert "duplicates.parquet does not read as Parquet" in caplog.text


@pytest.mark.cli
def test_unreadable_records_count_as_absent_not_as_a_crash(tmp_path):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out"
    assert run_in_process(_spec(prompts, out)).complete
    stats = sorted((out / "shards").glob("*.json"))
    full_record = (out / "_job.json").read_bytes()
    (out / "_job.json").write_bytes(full_record[:40])  # the disk filled during its write
    stats[0].write_bytes(b"")  # and during this shard's commit

    status = run_cli("status", str(out))
    _one_line_error(status, "no readable _job.json")

    result = run_in_process(_spec(prompts, out))
    assert result.complete and result.shards_run == 1, "the shard with the empty stats file is redone"
    assert json.loads((out / "_job.json").read_text())["status"] == "complete"

    # Files that are not a shard's stats, in shards/, are nobody's commit.
    (out / "shards" / "foreign.json").write_text('{"not": "a shard"}')
    (out / "shards" / "list.json").write_text("[]")
    assert run_in_process(_spec(prompts, out)).shards_run == 0

    # No job record: the folder counts as new, and it holds those two files imagemill did not write.
    (out / "_job.json").write_text("[]")
    with pytest.raises(ImagemillError, match=r"shards/foreign\.json, shards/list\.json"):
        run_in_process(_spec(prompts, out))
    assert run_in_process(_spec(prompts, out, allow_existing=True)).shards_run == 0
    for record in ("[]", '{"name": "only a name"}'):  # the second: a record of no schema version
        (out / "_job.json").write_text(record)
        changed = _spec(prompts, out, seed=2, allow_existing=True)
        assert run_in_process(changed, overwrite=True).shards_run == 2
    assert (out / "shards" / "foreign.json").exists() and (out / "shards" / "list.json").exists()
    assert _metadata(str(out)).num_rows == ROWS
    status = run_cli("status", str(out))
    assert status.returncode == 0 and "shards: 2/2 done" in status.stdout, status.stderr
