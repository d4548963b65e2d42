"""The records both sides share: metadata rows and their Parquet table, shard stats and the job record.

The JSON records (`_job.json`, `shards/*.json`) are strict pydantic models with a schema_version: they
round-trip exactly, refuse what is not theirs (a NaN, an unknown key), and a record of another schema
version (an older imagemill's, or a newer one's) is refused in one line by `status` and by a re-run,
which `--overwrite` then replaces.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_prompt_files
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.evaluation_results import (
    DiversityResult,
    DuplicatePair,
    EvaluationResults,
    FrechetDistanceResult,
    NearDuplicatesResult,
)
from imagemill.core.job_record import FailedShard, JobRecord, read_job_record, write_job_record
from imagemill.core.layout import JOB_RECORD, OutputLayout
from imagemill.core.records import (
    METADATA_SCHEMA,
    SCHEMA_VERSION,
    ClipScoreSummary,
    MetadataRow,
    OutdatedRecord,
    RunProgress,
    Sample,
    ShardStats,
    commit_shard,
    committed_shards,
    metadata_table,
    read_record,
)
from imagemill.core.write_gate import OwnedOutput
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import run_in_process

texts = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=2**40)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
samples = st.builds(
    Sample,
    id=texts,
    prompt=st.none() | texts,
    seed=st.none() | counts,
    thumbnail=texts,
    expanded_prompt=st.none() | texts,
    label=st.none() | texts,
)
shard_stats = st.builds(
    ShardStats,
    shard_id=texts,
    run_id=st.none() | texts,
    input_file=texts,
    rows=counts,
    ok=counts,
    filtered=counts,
    error=counts,
    errors_by_reason=st.dictionaries(texts, counts, max_size=3),
    error_examples=st.dictionaries(texts, st.lists(texts, max_size=2), max_size=2),
    finished_at=st.none() | texts,
    seconds=seconds,
    stage_seconds=st.dictionaries(texts, seconds, max_size=4),
    timeline=st.dictionaries(texts, st.lists(seconds, min_size=2, max_size=2), max_size=2),
    samples=st.lists(samples, max_size=2),
    clip_score=st.lists(st.floats(min_value=-100, max_value=100), max_size=5).map(ClipScoreSummary.of),
    expand_seconds=st.none() | seconds,
    labels=st.dictionaries(texts, st.dictionaries(st.sampled_from(["ok", "error"]), counts), max_size=2),
    device_seconds=st.none() | seconds,
    cost_usd=st.none() | seconds,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | counts | seconds | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
finite = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
labelled = {"all": st.none() | finite, "per_label": st.dictionaries(texts, st.none() | finite, max_size=2)}
evaluations = st.builds(
    EvaluationResults,
    images=counts,
    diversity=st.builds(DiversityResult, **labelled),
    near_duplicates=st.builds(
        NearDuplicatesResult,
        threshold=finite,
        file=texts,
        images=counts,
        groups=counts,
        examples=st.lists(st.builds(DuplicatePair, id=texts, nearest=texts, cosine=finite), max_size=2),
    ),
    fid=st.none() | st.builds(FrechetDistanceResult, **labelled),
)
job_records = st.builds(
    JobRecord,
    name=texts,
    spec=st.dictionaries(texts, JSON_VALUES, max_size=3),
    fingerprint=st.dictionaries(texts, JSON_VALUES, max_size=3),
    versions=st.dictionaries(texts, texts, max_size=3),
    started_at=texts,
    status=texts,
    shards_total=counts,
    rows_total=counts,
    input_rows=counts,
    input_files=counts,
    input_footers=st.dictionaries(texts, texts, max_size=3),
    run_id=texts,
    ended_at=st.none() | texts,
    shards_done=st.none() | counts,
    failed_shards=st.lists(
        st.builds(FailedShard, shard_id=texts, input_file=texts, attempts=counts, error=texts), max_size=2
    ),
    evaluation=st.none() | evaluations,
)


@given(shard_stats)
def test_shard_stats_round_trip_exactly(stats):
    written = stats.record_bytes()
    again = read_record(ShardStats, "shards/x.json", written)
    assert again == stats and again.record_bytes() == written
    assert json.loads(written)["schema_version"] == SCHEMA_VERSION


@given(job_records)
def test_job_records_round_trip_exactly(record):
    written = record.record_bytes()
    again = read_record(JobRecord, "_job.json", written)
    assert again == record and again.record_bytes() == written


@given(st.integers().filter(lambda version: version != SCHEMA_VERSION) | st.none())
def test_a_record_of_another_schema_version_is_refused_in_one_line(version):
    data = json.loads(ShardStats(shard_id="x", rows=1, ok=1, error=0).record_bytes())
    if version is None:
        del data["schema_version"]  # as every imagemill before versioned records wrote them
    else:
        data["schema_version"] = version
    with pytest.raises(OutdatedRecord) as refused:
        read_record(ShardStats, "out/shards/x.json", json.dumps(data).encode())
    message = str(refused.value)
    assert "\n" not in message and message.startswith("out/shards/x.json has ")
    found = "no schema_version" if version is None else f"schema_version {version}"
    assert found in message and f"writes schema_version {SCHEMA_VERSION}" in message
    assert "--overwrite" in message and "new output" in message


def test_records_refuse_a_nan_an_unknown_key_and_a_count_as_text():
    with pytest.raises(ValidationError):
        ShardStats(shard_id="x", rows=1, ok=1, error=0, seconds=math.nan)
    written = json.loads(ShardStats(shard_id="x", rows=1, ok=1, error=0).record_bytes())
    for broken in (
        {**written, "from_the_future": 1},
        {**written, "rows": "1"},
        {**written, "seconds": "NaN"},
    ):
        assert read_record(ShardStats, "shards/x.json", json.dumps(broken).encode(), warn=False) is None


def test_stats_carry_scores_and_expansion():
    stats = ShardStats(
        shard_id="a-rg0-1",
        rows=4,
        ok=3,
        filtered=1,
        error=0,
        stage_seconds={"read": 1.0, "text_encode": 0.5, "denoise": 3.0, "decode": 0.25},
        timeline={"read": [1.0, 2.0], "model": [2.0, 6.0]},
        clip_score=ClipScoreSummary.of([12.5, 30.2, 30.9]),
        expand_seconds=0.5,
        expansion_unchanged=0,
    )
    assert stats.clip_score is not None and stats.clip_score.count == 3
    assert stats.clip_score.histogram == {"12": 1, "30": 2}
    assert stats.model_seconds == 3.75 and stats.read_seconds == 1.0
    assert read_record(ShardStats, "shards/a-rg0-1.json", stats.record_bytes()) == stats


def _job_record(**fields) -> JobRecord:
    base = dict(
        name="j",
        spec={},
        fingerprint={},
        versions={},
        started_at="2026-01-01T00:00:00+00:00",
        status="running",
        shards_total=2,
        rows_total=2,
        input_rows=2,
        input_files=1,
        input_footers={"file:///in.parquet": "f"},
        run_id="r",
    )
    return JobRecord(**{**base, **fields})


def test_committed_shards_are_the_stats_written_for_their_shard(tmp_path, caplog):
    layout = OutputLayout(str(tmp_path))
    assert committed_shards(OutputLayout(str(tmp_path / "never-written"))) == {}
    owned = OwnedOutput.unleased(layout)
    write_job_record(owned, _job_record())
    (tmp_path / "shards").mkdir()  # the shards/ folder exists, but nothing is committed yet
    assert committed_shards(layout) == {}
    y = ShardStats(shard_id="y", input_file="file:///in.parquet", rows=1, ok=1, error=0)
    commit_shard(owned.attempt("y"), y)
    bad = json.loads(y.record_bytes()) | {"shard_id": "x"}
    del bad["rows"]
    owned.write_whole(OutputLayout.stats_path("x"), json.dumps(bad).encode())  # without its counts
    owned.write_whole(OutputLayout.stats_path("z"), y.record_bytes())  # y's stats under another name

    assert committed_shards(OutputLayout(str(tmp_path))) == {"y": y}  # as another process sees it
    status = job_status(str(tmp_path))
    assert (status.shards_done, status.ok) == (1, 1)  # y only: x is redone by the next run
    [warning] = {r.getMessage() for r in caplog.records if "shards/x.json" in r.getMessage()}
    assert "rows" in warning and "not a record imagemill can read" in warning
    assert any("shards/z.json" in r.getMessage() and "redone" in r.getMessage() for r in caplog.records)


def _row(**columns) -> MetadataRow:
    base = dict(
        id="row-1",
        prompt="a cat",
        prompt_truncated=False,
        negative_prompt=None,
        seed=7,
        num_inference_steps=2,
        guidance_scale=5.0,
        width=32,
        height=32,
        status="ok",
        model="tiny",
        input_file="file:///in.parquet",
        input_row=1,
    )
    return MetadataRow(**{**base, **columns})


def test_metadata_rows_make_the_documented_table(tmp_path):
    rows = [
        _row(path="images/s/row-1.png", sha256="ab" * 32, clip_score=21.5, key="s-000000"),
        _row(id="row-2", status="error", error="invalid_prompt: empty", prompt=" ", seed=None),
    ]
    plain = metadata_table(rows)
    assert plain.schema == METADATA_SCHEMA and "key" not in plain.schema.names
    assert plain.schema.names[:4] == ["id", "prompt", "expanded_prompt", "prompt_truncated"]
    assert str(plain.schema.field("seed").type) == "int64"
    assert str(plain.schema.field("clip_score").type) == "double"
    with_key = metadata_table(rows, ("key",))
    assert with_key.schema.names == [*METADATA_SCHEMA.names, "key"]
    pq.write_table(with_key, tmp_path / "m.parquet")
    back = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [MetadataRow(**row) for row in back] == rows


def _old_output(tmp_path: Path) -> tuple[imagemill.JobSpec, Path]:
    """A finished job's output whose records were written without a schema_version, as every
    imagemill before versioned records wrote them."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=8, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: old-output\ninput: {{path: '{tmp_path / 'prompts'}', rows_per_shard: 4}}\n"
        f"output: {{path: '{tmp_path / 'out'}'}}\nmodel: {{kind: noop}}\n"
        "generation: {width: 8, height: 8}\nworkers: {num_workers: 1, batch_size: 4}\n"
    )
    spec = imagemill.load_spec(str(job))
    assert run_in_process(spec).complete
    out = tmp_path / "out"
    for path in [out / JOB_RECORD, *(out / "shards").glob("*.json")]:
        record = json.loads(path.read_text())
        del record["schema_version"]
        path.write_text(json.dumps(record))
    return spec, job


def _refused_in_one_line(done, version: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("imagemill: error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert version in lines[0] and f"schema_version {SCHEMA_VERSION}" in lines[0]
    assert "--overwrite" in lines[0] and "_job.json" in lines[0]


@pytest.mark.cli
def test_an_output_of_another_schema_version_is_refused_by_status_and_a_rerun_until_overwritten(tmp_path):
    spec, job = _old_output(tmp_path)
    out = tmp_path / "out"
    _refused_in_one_line(run_cli("status", str(out)), "no schema_version")
    _refused_in_one_line(run_cli("run", str(job), "--no-progress"), "no schema_version")
    record = json.loads((out / JOB_RECORD).read_text())
    (out / JOB_RECORD).write_text(json.dumps(record | {"schema_version": SCHEMA_VERSION + 1}))
    _refused_in_one_line(run_cli("status", str(out)), f"schema_version {SCHEMA_VERSION + 1}")
    with pytest.raises(ImagemillError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        run_in_process(spec)

    result = run_in_process(spec, overwrite=True)
    assert result.complete and result.shards_run == 2, "--overwrite makes the output again"
    assert read_job_record(OutputLayout(str(out))).status == "complete"
    assert "8 ok, 0 error" in job_status(str(out)).text()


# --- reads by attribute only ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RECORD_MODULES = {"pipeline/core/records.py", "pipeline/core/job_record.py"}
# Its own record, `_lease.json` (which shares the key run_id), is not one of the typed records yet.
NOT_CHECKED = {"pipeline/core/lease.py"}
RECORD_FIELDS = {
    name
    for model in (JobRecord, FailedShard, ShardStats, Sample, ClipScoreSummary, RunProgress)
    for name in model.model_fields
}
RAW_READS = {"read_json", "read_bytes", "cat_file", "open"}
RECORD_NAMES = re.compile(r"(record|stats|previous|failure)$")  # what code calls a record it holds
RECORD_FILES = re.compile(r"\bJOB_RECORD\b|\bstats_path\(|_job\.json|shards/")


def record_key_reads(source: str) -> list[str]:
    """`record.get("field")`, `stats["field"]` (a field of the JSON records, on a name such as code
    gives a record it holds), and reads of `_job.json` or a stats file past the records modules
    (`read_json(JOB_RECORD)`, `read_bytes(layout.stats_path(...))`), as `line: code`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            receiver, key = node.value, node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            receiver, key = node.func.value, node.args[0]
            if node.func.attr in RAW_READS and RECORD_FILES.search(ast.unparse(key)):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
                continue
            if node.func.attr != "get" or not isinstance(key, ast.Constant):
                continue
            key = key.value
        else:
            continue
        name = ast.unparse(receiver).rpartition(".")[2]
        if key in RECORD_FIELDS and RECORD_NAMES.search(name):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_key_reads_and_raw_reads():
    planted = (
        'status = record.get("status")\nfailed = record["failed_shards"]\nok = stats["ok"]\n'
        "raw = output.read_json(JOB_RECORD)\nmine = output.read_bytes(output.stats_path(shard_id))\n"
    )
    assert len(record_key_reads(planted)) == 5
    assert record_key_reads('stages["idle"]\nrecord.status\nreport["status"]\nreport.get("counts")') == []


def test_job_records_and_stats_are_read_by_attribute_outside_the_records_modules():
    """The models hand out attributes (a model has no `get` and no `[...]`): no module outside
    imagemill.core.records and imagemill.core.job_record reads a job record or shard stats by key, or
    reads their files other than through those two."""
    offenders = {}
    for folder in ("pipeline", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name not in RECORD_MODULES | NOT_CHECKED and (reads := record_key_reads(path.read_text())):
                offenders[name] = reads
    assert offenders == {}
