"""`imagemill status`: each state of a job has its own exit code (docs/running.md's table), and a job
submitted but not started is a normal state printed on stdout, not an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagemill.cli.commands import main
from imagemill.core.job_record import JobRecord, write_job_record
from imagemill.core.layout import SUBMITTED, OutputLayout
from imagemill.core.lease import OutputLease
from imagemill.core.records import ShardStats, commit_shard
from imagemill.core.write_gate import OwnedOutput
from imagemill.reporting.outcome import BUDGET_REACHED, COMPLETE, INCOMPLETE, INTERRUPTED, NOTHING_GENERATED
from imagemill.reporting.status import STATUS_EXIT_CODES

INPUT = "file:///in.parquet"


def _job(
    out, status: str, shards: list[tuple[int, int]], total: int = 2, name: str = "states"
) -> OutputLayout:
    """An output whose record says `status`, with committed shards of (ok, error) rows."""
    output = OutputLayout(str(out))
    owned = OwnedOutput.unleased(output)  # the fixture's writes belong to no run
    record = JobRecord(
        name=name, spec={}, fingerprint={}, versions={}, started_at="2026-01-01T00:00:00+00:00",
        status=status, shards_total=total, rows_total=2 * total, input_rows=2 * total, input_files=1,
        input_footers={INPUT: "digest"}, run_id="run-1",
    )  # fmt: skip
    write_job_record(owned, record)
    for index, (ok, error) in enumerate(shards):
        stats = ShardStats(shard_id=f"s{index}", input_file=INPUT, rows=ok + error, ok=ok, error=error)
        commit_shard(owned.attempt(stats.shard_id), stats)
    return output


def _status(out, capsys) -> tuple[int, str, str]:
    code = main(["status", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("status", "shards", "state"),
    [
        (COMPLETE, [(2, 0), (2, 0)], COMPLETE),
        (INCOMPLETE, [(2, 0)], INCOMPLETE),
        (NOTHING_GENERATED, [(0, 2), (0, 2)], NOTHING_GENERATED),
        (BUDGET_REACHED, [(2, 0)], BUDGET_REACHED),
        (INTERRUPTED, [(2, 0)], INTERRUPTED),
        ("running", [(2, 0)], INTERRUPTED),  # on record as running, but no run holds the output
    ],
)
def test_each_ended_state_has_its_own_exit_code(tmp_path, capsys, status, shards, state):
    _job(tmp_path, status, shards)
    code, out, err = _status(tmp_path, capsys)
    assert code == STATUS_EXIT_CODES[state], (out, err)
    assert out.startswith("job states at ") and not err


def test_a_running_job_and_a_submitted_one_are_states_not_errors(tmp_path, capsys):
    output = _job(tmp_path / "running", "running", [(2, 0)])
    with OutputLease.held(output, "states"):
        code, out, err = _status(tmp_path / "running", capsys)
    assert code == STATUS_EXIT_CODES["running"] and "running (heartbeat" in out and not err

    submitted = OutputLayout(str(tmp_path / "submitted"))
    OwnedOutput.unleased(submitted).write_json(
        SUBMITTED, {"name": "states", "submission_id": "states-1", "address": "http://h"}
    )
    code, out, err = _status(tmp_path / "submitted", capsys)
    assert code == STATUS_EXIT_CODES["submitted, not started"]
    assert ": submitted, not started (Ray job states-1" in out and "error" not in out + err

    code, out, err = _status(tmp_path / "nothing", capsys)
    assert code == 2 and err.startswith("imagemill: error: no imagemill job found at ")


def test_the_codes_are_distinct_and_documented():
    assert len(set(STATUS_EXIT_CODES.values())) == len(STATUS_EXIT_CODES)
    assert 2 not in STATUS_EXIT_CODES.values()  # the CLI's "a problem with the command"
    page = (Path(__file__).parents[1] / "docs" / "running.md").read_text(encoding="utf-8")
    for state, code in STATUS_EXIT_CODES.items():
        assert f"| {code} | {state} |" in page, f"docs/running.md's status table lacks {code} {state}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=30))
def test_a_job_name_from_a_file_is_one_line_in_status(tmp_path_factory, capsys, name):
    """A record or submission note anyone could have written (a name with a newline, a carriage return,
    an escape sequence) makes no extra status line: its control characters are shown escaped."""
    out = tmp_path_factory.mktemp("named")
    _job(out / "record", COMPLETE, [(2, 0), (2, 0)], name=name)
    OwnedOutput.unleased(OutputLayout(str(out / "note"))).write_json(
        SUBMITTED, {"name": name, "submission_id": f"id{name}", "address": "http://h"}
    )
    for where, lines in (("record", 3), ("note", 1)):  # as many as for a plain name
        _, text, _ = _status(out / where, capsys)
        assert text.endswith("\n") and len(text.split("\n")) == lines + 1, text
        assert all(line.isprintable() for line in text.splitlines()), text


def test_a_job_name_with_a_control_character_is_refused_in_the_spec():
    import imagemill
    from imagemill.core.errors import ImagemillError

    spec = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"kind": "noop"}}
    with pytest.raises(ImagemillError, match=r"name.*one line of printable characters, not 'nightly\\n2'"):
        imagemill.build_spec({**spec, "name": "nightly\n2"})
