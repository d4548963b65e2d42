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
