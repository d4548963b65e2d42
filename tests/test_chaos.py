"""The chaos soak's short version (bench/chaos.py): a 3-node cluster_utils cluster, `imagemill run`
drivers killed, paused past their lease and taken over, nodes removed and drained, actors killed, S3
503s, slow-downs and dropped connections, `_job.json` cut short; then a quiet run. The soak checks
every row once, every file byte-identical to an undisturbed run, the bucket's other keys untouched,
no write after a lost lease (the write audit log) and status/report against the files; it exits 0
only when all hold. The full 20-minute soak's figures are in RELIABILITY.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cluster
@pytest.mark.slow
def test_the_short_chaos_soak_passes(tmp_path):
    results = tmp_path / "RELIABILITY.md"
    soak = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--minutes", "1", "--rows", "2000"]
        + ["--event-gap", "5", "--seed", "1", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert soak.returncode == 0, soak.stdout[-6000:] + soak.stderr[-3000:]
    section = results.read_text()
    assert ": PASS" in section, section
    assert "events injected: driver_kill" in section, section


def _line(run, op, path, start, end=None):
    return {"run": run, "op": op, "path": path, "start": start, "end": start + 0.01 if end is None else end}


def test_the_soak_finds_a_write_after_a_lost_lease_outside_the_outputs_or_without_a_run():
    """The audit check of bench/chaos.py, on logs made up here: it must fail on each violation."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from chaos import check_audit
    finally:
        sys.path.remove(str(ROOT / "bench"))
    lease, image = "b/out/_lease.json", "b/out/images/s/a.png"
    a_then_b = [_line("A", "lease_take", lease, 1.0), _line("A", "publish", image, 2.0)]
    a_then_b += [_line("B", "lease_take", lease, 5.0)]
    assert check_audit(a_then_b, ["b/out"]) == ([], 0)
    late = check_audit([*a_then_b, _line("A", "publish", "b/out/images/s/b.png", 6.0)], ["b/out"])[0]
    assert len(late) == 1 and late[0].startswith("run A wrote after losing b/out's lease"), late
    overlapping = [*a_then_b, _line("A", "write", "b/out/_job.json", 4.9, 5.5)]
    assert check_audit(overlapping, ["b/out"]) == ([], 1)  # reported, not failed: it began in time
    after_release = [*a_then_b[:2], _line("A", "lease_release", lease, 3.0), _line("A", "delete", image, 4.0)]
    assert check_audit(after_release, ["b/out"])[0], "a write after the run's own release"
    outside = [*a_then_b, _line("B", "delete", "b/out/x b/outside/y", 6.0)]
    assert check_audit(outside, ["b/out"])[0] == ["run B wrote outside the outputs: delete ['b/outside/y']"]
    assert check_audit([_line(None, "write", "b/out/_job.json", 1.0)], ["b/out"])[0]
    assert check_audit([_line("C", "write", "b/out/_job.json", 1.0)], ["b/out"])[0], "a run with no lease"
