"""The job's budget: `workers.max_gpu_hours` and `workers.max_cost_usd` over all runs of its output.

What counts is the device-time ledger's totals (imagemill.core.device_ledger): every attempt's device
time and cost, committed or failed, in this run and the earlier ones, so a re-run with the same budget
does no more work than the first, and a cron that re-runs a stopped or failing job cannot spend past
it; to go on, raise the budget (it is not in the fingerprint) and run again. Once reached the
scheduler hands out no new shard; shards already running finish and count, so a job may end a little
over.
"""

from __future__ import annotations

from imagemill.core.device_ledger import DeviceLedger
from imagemill.core.spec import WorkersSpec

BUDGET_EXIT_STATUS = 3  # `imagemill run` when the budget stopped the job before every shard ran


class Budget:
    def __init__(self, workers: WorkersSpec, ledger: DeviceLedger):
        """`ledger`: the job's, which the runner adds each attempt to as it ends."""
        self.workers = workers
        self.ledger = ledger

    @property
    def device_hours(self) -> float:
        return self.ledger.totals().device_seconds / 3600

    @property
    def cost_usd(self) -> float:
        return self.ledger.totals().cost_usd or 0.0

    def reached(self) -> str | None:
        """Which limit the job's attempts have reached, as `setting=limit (spent)`; None if none."""
        limits = (
            ("workers.max_gpu_hours", self.workers.max_gpu_hours, lambda: self.device_hours, "device-hours"),
            ("workers.max_cost_usd", self.workers.max_cost_usd, lambda: self.cost_usd, "USD"),
        )
        for setting, limit, spent, unit in limits:
            if limit is not None and spent() >= limit:
                return f"{setting}={limit:g} ({spent():.6g} {unit} spent)"
        return None
