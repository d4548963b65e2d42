"""Per-label accounting: with a label column carried, `imagemill status` and the report count ok /
filtered / error rows per label, and the report's samples show every label."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import run_cli

import imagemill
from imagemill.core.carry import Carried
from imagemill.core.records import MetadataRow, Sample, ShardStats, read_record, shard_totals
from imagemill.core.shard import Shard
from imagemill.workers.device_use import DeviceUse
from imagemill.workers.rows import Row
from imagemill.workers.shard_records import ShardRun

LABELS = ["circle", "square", "triangle", None]


def _write_input(folder: Path) -> dict[str, dict[str, int]]:
    """Two files of 8 rows, labels in turn; rows 5 and 12 have no prompt (error rows).
    Returns the expected counts per label."""
    folder.mkdir()
    expected: dict[str, dict[str, int]] = {}
    for file in range(2):
        rows = []
        for k in range(8):
            n = file * 8 + k
            label = LABELS[n % len(LABELS)]
            prompt = None if n in (5, 12) else f"a shape {n}"
            rows.append({"id": f"r{n:02d}", "prompt": prompt, "shape": label})
            key = "null" if label is None else label
            counts = expected.setdefault(key, {"ok": 0, "filtered": 0, "error": 0})
            counts["ok" if prompt else "error"] += 1
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{file}.parquet", row_group_size=4)
    return expected


def test_status_and_report_count_rows_per_label_and_sample_every_label(ray_session, tmp_path):
    expected = _write_input(tmp_path / "prompts")
    out = tmp_path / "out"
    spec = imagemill.build_spec(
        {
            "input": {
                "path": str(tmp_path / "prompts"),
                "rows_per_shard": 4,
                "carry_columns": ["shape"],
                "label_column": "shape",
            },
            "output": {"path": str(out)},
            "model": {"kind": "noop"},
            "generation": {"width": 16, "height": 16},
            "workers": {"num_workers": 2},
        }
    )
    result = imagemill.run(spec, progress=False)
    assert result.complete and (result.ok, result.errors) == (14, 2)

    status = run_cli("status", str(out))
    assert status.returncode == 0, status.stderr
    for label, counts in expected.items():
        line = f"  {label}: {counts['ok']} ok, {counts['filtered']} filtered, {counts['error']} error"
        assert line in status.stdout.splitlines(), status.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == dict(sorted(expected.items()))
    assert {sample["label"] for sample in report["samples"]} == set(expected)
    html = (out / "report.html").read_text()
    assert 'id="labels"' in html and "triangle" in html


def _row(index: int, error: str | None = None) -> Row:
    return Row(
        index=index, input_row=index, row_id=f"r{index}", prompt="p", negative_prompt=None, seed=1,
        width=8, height=8, num_inference_steps=1, guidance_scale=1.0, error=error,
    )  # fmt: skip


def test_a_shards_stats_count_filtered_rows_per_label_and_keep_a_sample_of_each():
    """What the actor counts: a row's status as its metadata says (ok, filtered by its CLIP score),
    or error; and one thumbnail per label beside the first ones."""
    run = ShardRun(shard=Shard("s", "in.parquet", "in", 0, 1, 0, 6), model="m", label_column="label")
    run.rows = [_row(0), _row(1), _row(2), _row(3), _row(4, "invalid_prompt: empty"), _row(5)]
    labels = pa.table({"label": pa.array([7, 7, 8, 8, 9, 10])})
    run.carried = Carried(labels, [0, 1, 2, 3, 4, 5])
    for index, status in ((0, "ok"), (1, "filtered"), (2, "ok"), (3, "ok"), (5, "filtered")):
        run.written[index] = MetadataRow(
            id=f"r{index}", prompt="p", prompt_truncated=False, negative_prompt=None, seed=1,
            num_inference_steps=1, guidance_scale=1.0, width=8, height=8, status=status, model="m",
            input_file="in.parquet", input_row=index,
        )  # fmt: skip
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    run.add_samples([(run.rows[i], image) for i in (0, 1, 2, 3, 5)], ThreadPoolExecutor(1).submit)
    stats = run.stats("cpu", None, DeviceUse("CPU", None, 1.0, None))
    assert stats.labels == {
        "7": {"ok": 1, "filtered": 1, "error": 0},
        "8": {"ok": 2, "filtered": 0, "error": 0},
        "9": {"ok": 0, "filtered": 0, "error": 1},
        "10": {"ok": 0, "filtered": 1, "error": 0},
    }
    assert [sample.label for sample in stats.samples] == ["7", "7", "8", "10"]

    again = read_record(ShardStats, "shards/s.json", stats.record_bytes())
    assert shard_totals([again, again]).labels["8"] == {"ok": 4, "filtered": 0, "error": 0}


def test_stats_without_labels_count_none():
    stats = ShardStats(shard_id="s", rows=2, ok=2, error=0, samples=[Sample(id="a")])
    stats = read_record(ShardStats, "shards/s.json", stats.record_bytes())
    assert stats.labels == {} and stats.samples[0].label is None
    assert shard_totals([stats]).labels == {}
