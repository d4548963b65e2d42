"""The device-time ledger (issue 23 item 7): every attempt's device time counts, committed or failed,
toward `workers.max_gpu_hours` across re-runs, `_job.json`'s cost, the report and `imagemill status`.

The failing attempts are real ones: a shard whose commit (its stats file) always answers 500 through
the S3 fault proxy, after its images were drawn and written, as in test_faults.py.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import yaml
from conftest import make_bucket, write_prompt_files
from hypothesis import given
from hypothesis import strategies as st

import imagemill
from imagemill.core.cost import DeviceCharge
from imagemill.core.device_ledger import (
    DeviceLedger,
    FailedAttempt,
    LedgerEntry,
    read_ledger,
    record_failed_attempt,
)
from imagemill.core.job_record import read_job_record
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.budget import BUDGET_EXIT_STATUS
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import run_in_process
from imagemill.testing.s3_fault_proxy import S3FaultProxy

STUCK = "part-000-rg00000-00001"  # the one shard of one file of 4 rows


def _charges() -> st.SearchStrategy[DeviceCharge]:
    seconds = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
    return st.builds(
        DeviceCharge,
        device_seconds=seconds,
        device_kind=st.sampled_from(["GPU", "CPU"]),
        accelerator_type=st.sampled_from([None, "H100"]),
        cost_usd=st.none() | seconds,
    )


@st.composite
def _entries_and_pieces(draw):
    """Distinct attempts, cut into pieces (an attempt may sit in two pieces: read twice), the pieces
    shuffled and grouped at random."""
    n = draw(st.integers(0, 20))
    entries = [
        LedgerEntry((kind, f"s{i}"), draw(st.none() | _charges()), draw(st.integers(0, 99)), kind == "failed")
        for i, kind in enumerate(
            draw(st.lists(st.sampled_from(["committed", "failed"]), min_size=n, max_size=n))
        )
    ]
    pieces = draw(st.lists(st.lists(st.sampled_from(entries)) if entries else st.just([]), max_size=6))
    pieces.append(entries)  # every attempt is in some piece
    return entries, draw(st.permutations(pieces))


def _merged(pieces: list[list[LedgerEntry]]) -> DeviceLedger:
    """Merge the pieces' ledgers as a tree whose shape depends on the piece count (any grouping)."""
    ledgers = [DeviceLedger(piece) for piece in pieces]
    while len(ledgers) > 1:
        ledgers = [
            ledgers[i].merge(ledgers[i + 1]) if i + 1 < len(ledgers) else ledgers[i]
            for i in range(0, len(ledgers), 2)
        ]
    return ledgers[0]


@given(_entries_and_pieces())
def test_the_ledgers_totals_merge_from_pieces_in_any_order(case):
    """Pieces in any order and grouping, an attempt read twice counted once: the same totals, exactly."""
    entries, pieces = case
    whole = DeviceLedger(entries).totals()
    assert _merged(pieces).totals() == whole
    assert DeviceLedger(reversed(entries)).totals() == whole
    failed = [entry for entry in entries if entry.failed]
    assert whole.failed_attempts == len(failed)
    assert whole.images == sum(entry.images for entry in entries)


def _job(tmp_path, bucket: str, endpoint: str, tiny_model: str, **workers) -> dict:
    """One shard of 4 rows, drawn by the tiny model (tens of ms: a charge rounded to ms is never 0),
    into S3 through `endpoint`; a budget of 1e-9 device-hours (3.6 µs), reached by any attempt."""
    options = {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    return {
        "name": "ledger",
        "input": {"path": str(tmp_path / "in"), "rows_per_shard": 4},
        "output": {"path": f"{bucket}/out", "storage_options": options},
        "model": {"source": tiny_model, "device": "cpu"},
        "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
        "workers": {"num_workers": 1, "batch_size": 4, "max_gpu_hours": 1e-9, "max_shard_attempts": 3}
        | workers,
        "cost": {"gpu_hour_usd": 2.0},
    }


def _failed_attempts(bucket: str) -> list[FailedAttempt]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    record = json.loads(fs.cat_file(f"{bucket}/out/attempts/{STUCK}.json"))
    return [FailedAttempt.model_validate(attempt) for attempt in record["failed"]]


def test_failed_attempts_in_process_count_toward_the_budget_of_the_next_run(
    s3_endpoint, tmp_path, tiny_model
):
    """In process, the shard's error is raised as before, its device time recorded first: the re-run
    finds the budget spent and stops, instead of failing the shard again."""
    bucket = make_bucket(f"ledger-in-process-{uuid.uuid4().hex[:8]}")
    write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
    with S3FaultProxy(
        s3_endpoint, broken_paths={f"{bucket.removeprefix('s3://')}/out/shards/{STUCK}.json"}
    ) as proxy:
        spec = imagemill.build_spec(_job(tmp_path, bucket, proxy.url, tiny_model))
        with pytest.raises(OSError, match="internal error"):
            run_in_process(spec)
        [failed] = _failed_attempts(bucket)
        assert failed.charge.device_kind == "CPU" and failed.charge.device_seconds > 0 and failed.reported
        assert failed.charge.cost_usd == pytest.approx(failed.charge.device_seconds / 3600 * 2.0)
        requests = proxy.requests
        again = run_in_process(spec)
        assert again.state == "stopped: budget reached", again.summary()
        assert proxy.by_path[("PUT", f"/{bucket.removeprefix('s3://')}/out/shards/{STUCK}.json")] <= requests
    assert len(_failed_attempts(bucket)) == 1, "the re-run handed out nothing"
    assert again.cost.failed_attempts == 1
    assert again.cost.device_seconds == again.cost.failed_device_seconds == failed.charge.device_seconds


def test_a_shard_that_always_fails_stops_re_runs_at_the_budget_with_exit_3(
    ray_session, s3_endpoint, tmp_path, tiny_model, capsys
):
    """Through Ray and the CLI: the failing attempt's device time reaches the budget, so the run stops
    with exit 3 (not 1, as when failed attempts counted nothing, run after run); a re-run with the same
    budget tries nothing more; `_job.json`, the report and `status` show the failed attempt's time."""
    from imagemill.cli.commands import main

    bucket = make_bucket(f"ledger-ray-{uuid.uuid4().hex[:8]}")
    write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
    with S3FaultProxy(
        s3_endpoint, broken_paths={f"{bucket.removeprefix('s3://')}/out/shards/{STUCK}.json"}
    ) as proxy:
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(_job(tmp_path, bucket, proxy.url, tiny_model)))
        assert main(["run", str(job), "--no-progress"]) == BUDGET_EXIT_STATUS
        printed = capsys.readouterr().out
        assert "stopped: budget reached: workers.max_gpu_hours=1e-09" in printed, printed
        [failed] = _failed_attempts(bucket)
        assert failed.charge.device_seconds > 0 and failed.reported and failed.attempt == 1

        assert main(["run", str(job), "--no-progress"]) == BUDGET_EXIT_STATUS, (
            "the budget counts failed attempts"
        )
        assert len(_failed_attempts(bucket)) == 1, "the re-run tried nothing"

        output = OutputLayout(f"{bucket}/out", {"endpoint_url": proxy.url})
        cost = read_job_record(output).cost
        assert (cost.failed_attempts, cost.images) == (1, 0)
        assert cost.device_seconds == cost.failed_device_seconds == failed.charge.device_seconds
        assert cost.cost_usd == pytest.approx(failed.charge.cost_usd)
        report = json.loads(output.read_bytes("report.json"))
        assert report["cost"]["failed_attempts"] == 1
        assert "1 failed attempts" in output.read_bytes("report.html").decode()
        assert "in 1 failed attempts" in job_status(f"{bucket}/out", {"endpoint_url": proxy.url}).text()

        proxy.broken_paths.clear()  # fixed, and the budget raised: the job completes
        assert main(["run", str(job), "--no-progress", "--set", "workers.max_gpu_hours=1000"]) == 0
    cost = read_job_record(OutputLayout(f"{bucket}/out")).cost
    assert cost.failed_attempts == 1 and cost.images == 4
    assert cost.device_seconds > cost.failed_device_seconds == failed.charge.device_seconds


@pytest.mark.parametrize(
    "charge",
    [
        {"device_seconds": -1e9},  # would un-spend the budget
        {"device_seconds": 1e308},  # would overflow the sums
        {"device_seconds": "NaN"},
        {"cost_usd": -5.0},
    ],
)
def test_a_broken_or_hostile_attempts_record_counts_nothing_and_crashes_nothing(tmp_path, charge, caplog):
    """A record of failed attempts that says less than nothing or more than any sum holds does not
    read (a warning), like a stats file that does not: the ledger, status and a new attempt go on."""
    output = OutputLayout(str(tmp_path / "out"))
    good = DeviceCharge(device_seconds=10.0, device_kind="GPU", accelerator_type="H100", cost_usd=0.01)
    attempt = FailedAttempt(
        run_id="r", attempt=1, ended_at="2026-01-01T00:00:00+00:00", error="x", reported=True, charge=good
    )
    record_failed_attempt(OwnedOutput.unleased(output), "a", attempt)
    record_failed_attempt(OwnedOutput.unleased(output), "b", attempt)
    path = tmp_path / "out" / "attempts" / "b.json"
    data = json.loads(path.read_text())
    data["failed"][0]["charge"] |= charge
    path.write_text(json.dumps(data).replace('"NaN"', "NaN"))
    (tmp_path / "out" / "attempts" / "notes.txt").write_text("a user's file")
    totals = read_ledger(output, []).totals()
    assert (totals.failed_attempts, totals.device_seconds) == (1, 10.0), "b's record counts nothing"
    assert "b.json is not a record imagemill can read" in caplog.text
    record_failed_attempt(
        OwnedOutput.unleased(output), "b", attempt
    )  # a new attempt starts the unreadable record afresh
    assert read_ledger(output, []).totals().failed_attempts == 2


def test_overwrite_deletes_the_previous_jobs_failed_attempts_and_nothing_else(tmp_path):
    """`--overwrite` starts a new job: the old job's failed attempts no longer count toward its budget;
    a file of someone else's in attempts/ is kept (the output allows existing files)."""
    write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
    spec = imagemill.build_spec(
        {
            "name": "overwritten",
            "input": {"path": str(tmp_path / "in")},
            "output": {"path": str(tmp_path / "out"), "allow_existing": True},
            "model": {"source": "", "kind": "noop"},
            "generation": {"width": 32, "height": 32},
            "workers": {"batch_size": 4},
        }
    )
    assert run_in_process(spec).complete
    output = OutputLayout(str(tmp_path / "out"))
    charge = DeviceCharge(device_seconds=7.0, device_kind="CPU", accelerator_type=None, cost_usd=None)
    old = FailedAttempt(
        run_id="old",
        attempt=1,
        ended_at="2026-01-01T00:00:00+00:00",
        error="x",
        reported=False,
        charge=charge,
    )
    record_failed_attempt(OwnedOutput.unleased(output), STUCK, old)
    record_failed_attempt(OwnedOutput.unleased(output), "a-shard-of-a-gone-file", old)
    (tmp_path / "out" / "attempts" / "mine.txt").write_text("not imagemill's")
    assert run_in_process(spec).cost.failed_attempts == 2, "a resume counts them"
    result = run_in_process(spec, overwrite=True)
    assert result.cost.failed_attempts == 0 and result.complete
    assert sorted(path.name for path in (tmp_path / "out" / "attempts").iterdir()) == ["mine.txt"]
