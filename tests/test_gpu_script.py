"""bench/gpu.sh keeps to its time budget on a lent device: its steps' limits and its set-up add up to no
more than the budget, which it checks before anything runs (the whole run, by hand: `--dry-run`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
DEFAULT_BUDGET = 510  # 8.5 of a lent machine's 10 minutes


def test_the_steps_fit_the_budget_and_a_plan_over_it_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env={**os.environ, "BUDGET": "1", "OUT": str(tmp_path), "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    planned = re.search(r"add up to (\d+) s, over the budget of 1 s", done.stdout)
    assert planned, done.stdout + done.stderr
    assert 0 < int(planned.group(1)) <= DEFAULT_BUDGET
    assert not any(tmp_path.iterdir()), "nothing ran: no log, no copy of BENCHMARKS.md"
