"""Cost and budget (issue 16): device-seconds per shard and per job, priced by `cost.gpu_hour_usd`;
`workers.max_gpu_hours` / `max_cost_usd` stop a job early with exit 3, and it resumes."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_prompt_files

import imagemill
from imagemill.core.cost import CPU, GPU, hourly_price
from imagemill.core.device_ledger import DeviceLedger
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout
from imagemill.core.records import ShardStats, committed_shards
from imagemill.execution.budget import BUDGET_EXIT_STATUS, Budget
from imagemill.planning.shards import plan_shards

PRICES = {"H100": 3.0, "A10G": 1.0, "CPU": 0.05}


def _spec(tmp_path, **sections):
    base = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "model": {"source": "noop", "kind": "noop"},
    }
    return imagemill.build_spec(base | sections)


def test_a_price_is_per_device_hour_or_per_accelerator_type_as_ray_names_it():
    assert hourly_price(2.5, GPU, "H100") == hourly_price(2.5, CPU, None) == 2.5
    assert hourly_price(PRICES, GPU, "A10G") == 1.0
    assert hourly_price(PRICES, CPU, None) == 0.05
    assert hourly_price(PRICES, GPU, "L4") is None, "a type the map does not price stays unpriced"
    assert hourly_price(PRICES, GPU, None) is None
    assert hourly_price(None, GPU, "H100") is None


def test_prices_and_budgets_are_not_in_the_fingerprint_so_a_resume_may_raise_them(tmp_path):
    plain = _spec(tmp_path)
    budgeted = _spec(
        tmp_path, cost={"gpu_hour_usd": PRICES}, workers={"max_gpu_hours": 0.5, "max_cost_usd": 10}
    )
    assert budgeted.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"workers": {"max_cost_usd": 5}}, "max_cost_usd needs cost.gpu_hour_usd"),
        ({"cost": {"gpu_hour_usd": -1}}, "prices must be 0 or more"),
        ({"cost": {"gpu_hour_usd": {"H100": -3}}}, "prices must be 0 or more"),
        ({"workers": {"max_gpu_hours": 0}}, "max_gpu_hours"),
    ],
)
def test_budget_and_price_settings_that_cannot_work_are_refused(tmp_path, sections, message):
    with pytest.raises((ImagemillError, ValueError), match=message):
        _spec(tmp_path, **sections)


def _stats(shard_id: str, seconds: float | None, cost: float | None, ok: int = 10) -> ShardStats:
    return ShardStats(
        shard_id=shard_id, rows=ok, ok=ok, error=0, device_seconds=seconds, device_kind=GPU, cost_usd=cost
    )


def test_the_job_cost_sums_its_shards_and_prices_1000_images():
    shards = [_stats("b", 1800.0, 1.5), _stats("a", 1800.0, 1.5), _stats("c", 36.0, None)]
    cost = DeviceLedger.of_committed(shards).totals()
    assert cost.device_seconds == 3636.0
    assert cost.cost_usd == 3.0
    assert cost.unpriced_device_seconds == 36.0
    assert cost.usd_per_1000_images == pytest.approx(100.0)  # $3 for 30 images
    assert "1.01 GPU-hours" in cost.text() and "$100.0000 / 1,000 images" in cost.text()
    unpriced = DeviceLedger.of_committed([ShardStats(shard_id="in-process", rows=1, ok=1, error=0)]).totals()
    assert (unpriced.device_seconds, unpriced.cost_usd, unpriced.usd_per_1000_images) == (0.0, None, None)


def test_the_budget_counts_every_committed_shard_as_they_come(tmp_path):
    spec = _spec(tmp_path, cost={"gpu_hour_usd": 1.0}, workers={"max_gpu_hours": 1, "max_cost_usd": 2})
    ledger = DeviceLedger.of_committed([_stats("a", 1800.0, 0.5)])
    budget = Budget(spec.workers, ledger)
    assert budget.reached() is None
    ledger.add_committed(_stats("b", 1800.0, 0.5))
    assert budget.reached() == "workers.max_gpu_hours=1 (1 device-hours spent)"
    spec = _spec(tmp_path, cost={"gpu_hour_usd": 1.0}, workers={"max_cost_usd": 0.75})
    assert Budget(spec.workers, ledger).reached() == "workers.max_cost_usd=0.75 (1 USD spent)"


def test_a_shard_records_the_cpu_seconds_it_held_the_device_and_their_price(tmp_path, tiny_model):
    """The actor's own stats, in-process: CPU-seconds are the model turn times the CPUs it holds."""
    from imagemill.workers.worker import ShardWorker

    write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
    spec = _spec(
        tmp_path,
        model={"source": tiny_model, "device": "cpu"},
        generation={"width": 32, "height": 32, "num_inference_steps": 2},
        workers={"batch_size": 4, "num_cpus_per_worker": 2},
        cost={"gpu_hour_usd": {"H100": 3.0, "CPU": 0.36}},
    )
    [shard] = plan_shards(spec.input).shards
    stats = ShardWorker(spec).process_shard(shard)
    model_turn = stats.timeline["model"][1] - stats.timeline["model"][0]
    assert stats.device_kind == CPU and stats.accelerator_type is None
    assert stats.device_seconds == pytest.approx(2 * (model_turn + stats.stage_seconds["idle"]), abs=0.01)
    assert stats.device_seconds >= 2 * stats.model_seconds > 0
    assert stats.cost_usd == pytest.approx(stats.device_seconds / 3600 * 0.36)
    assert committed_shards(OutputLayout(str(tmp_path / "out")))[shard.shard_id].cost_usd == stats.cost_usd


def test_a_job_stopped_by_its_budget_exits_3_and_resumes_when_it_is_raised(ray_session, tmp_path, capsys):
    """Acceptance 5, through Ray and the CLI: a tiny max_gpu_hours stops handing out shards after the
    first ones; the same budget again does no more (it counts all runs of the output); raised, the
    job resumes and completes, and _job.json's cost is the sum of its shards'."""
    from imagemill.cli.commands import main

    write_prompt_files(str(tmp_path / "in"), 1, 6, 6)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "budgeted",
                "input": {"path": str(tmp_path / "in"), "rows_per_shard": 2},
                "output": {"path": str(tmp_path / "out")},
                "model": {"source": "", "kind": "noop", "device": "cpu"},
                "generation": {"width": 32, "height": 32},
                "workers": {"num_workers": 1, "batch_size": 2, "max_gpu_hours": 1e-9},
                "cost": {"gpu_hour_usd": 2.0},
            }
        )
    )
    out = tmp_path / "out"

    def shards() -> list[ShardStats]:
        return list(committed_shards(OutputLayout(str(out))).values())

    assert main(["run", str(spec), "--no-progress"]) == BUDGET_EXIT_STATUS == 3
    printed = capsys.readouterr().out
    assert "stopped: budget reached: workers.max_gpu_hours=1e-09" in printed
    assert "raise it (--set workers.max_gpu_hours=...) and run the same command again" in printed
    first = shards()
    assert 0 < len(first) <= 2, "the one actor's two queued shards finish; no new shard starts"
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "stopped: budget reached"
    assert not (out / "_SUCCESS").exists()

    assert main(["run", str(spec), "--no-progress"]) == 3, "the budget counts every run of the output"
    assert len(shards()) == len(first)

    assert main(["run", str(spec), "--no-progress", "--set", "workers.max_gpu_hours=1000"]) == 0
    done = shards()
    assert len(done) == 3 and (out / "_SUCCESS").exists()
    cost = json.loads((out / "_job.json").read_text())["cost"]
    assert cost["device_kinds"] == ["CPU"]
    assert cost["cost_usd"] == pytest.approx(sum(stats.cost_usd for stats in done), rel=1e-12)
    assert cost["device_seconds"] == pytest.approx(sum(stats.device_seconds for stats in done), abs=1e-3)
    assert cost["usd_per_1000_images"] == pytest.approx(cost["cost_usd"] / 6 * 1000)
    report = json.loads((out / "report.json").read_text())
    assert report["cost"]["usd_per_1000_images"] == cost["usd_per_1000_images"]
    assert f"${cost['usd_per_1000_images']:.4f}" in (out / "report.html").read_text()
    assert "$ / 1,000 images" in (out / "report.html").read_text()
    capsys.readouterr()
    main(["status", str(out)])
    assert "cost:   " in capsys.readouterr().out
