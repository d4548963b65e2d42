"""The records both sides share: metadata rows and their Parquet table, shard stats and their JSON.

Outputs written by an earlier imagemill stay readable: shard stats of the previous shape (with
`read_seconds`, `generate_seconds`, without `stage_seconds`, `filtered`, `clip_score`, ...) are read
by `imagemill status`, the report and a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import write_prompt_files

import imagemill
from imagemill.core.layout import OutputLayout
from imagemill.core.records import METADATA_SCHEMA, ClipScoreSummary, MetadataRow, ShardStats, metadata_table
from imagemill.planning.shards import plan_shards
from imagemill.reporting.report import write_report
from imagemill.reporting.status import job_status

DROPPED = ("read_seconds", "generate_seconds")  # they only repeated stage_seconds


def old_stats(
    shard_id: str, rows: int, ok: int, input_file: str = "file:///somewhere/part-000.parquet"
) -> dict:
    """Stats as an imagemill from before the stage split and scoring wrote them, plus a key no
    imagemill knows."""
    return {
        "shard_id": shard_id,
        "input_file": input_file,
        "rows": rows,
        "ok": ok,
        "error": rows - ok,
        "errors_by_reason": {"invalid_prompt": rows - ok} if rows > ok else {},
        "finished_at": "2025-01-01T00:01:00+00:00",
        "seconds": 12.5,
        "read_seconds": 1.0,
        "generate_seconds": 10.0,
        "write_wait_seconds": 1.5,
        "images_per_second": 0.6,
        "device": "cpu",
        "samples": [
            {"id": "row-00000", "prompt": "a cat", "seed": 1, "thumbnail": "data:image/jpeg;base64,"}
        ],
        "from_the_future": {"anything": 1},
    }


def test_stats_of_the_previous_shape_are_read_and_written_without_the_repeated_fields():
    stats = ShardStats.from_json(old_stats("a-rg0-1", rows=10, ok=8))
    assert (stats.rows, stats.ok, stats.filtered, stats.error) == (10, 8, 0, 2)
    assert stats.errors_by_reason == {"invalid_prompt": 2}
    assert stats.stage_seconds == {} and stats.clip_score is None and stats.expand_seconds is None
    assert stats.samples[0].id == "row-00000" and stats.samples[0].expanded_prompt is None
    assert stats.write_wait_seconds == 1.5  # not a repeat: the wall time the call waited on its writes

    written = stats.to_json()
    assert not set(DROPPED) & set(written) and "from_the_future" not in written
    assert "expand_seconds" not in written, "expansion fields only for jobs that expand"
    assert ShardStats.from_json(json.loads(json.dumps(written))) == stats


def test_stats_round_trip_through_json_with_scores_and_expansion():
    stats = ShardStats.from_json(
        {
            **old_stats("a-rg0-1", rows=4, ok=3),
            "filtered": 1,
            "error": 0,
            "stage_seconds": {"read": 1.0, "text_encode": 0.5, "denoise": 3.0, "decode": 0.25},
            "timeline": {"read": [1.0, 2.0], "model": [2.0, 6.0]},
            "clip_score": ClipScoreSummary.of([12.5, 30.2, 30.9]).to_json(),
            "expand_seconds": 0.5,
            "expansion_unchanged": 0,
        }
    )
    assert stats.clip_score is not None and stats.clip_score.count == 3
    assert stats.clip_score.histogram == {"12": 1, "30": 2}
    assert stats.model_seconds == 3.75 and stats.read_seconds == 1.0
    written = stats.to_json()
    assert written["expand_seconds"] == 0.5 and written["expansion_unchanged"] == 0
    assert ShardStats.from_json(json.loads(json.dumps(written))) == stats


def test_a_stats_file_without_its_counts_commits_nothing_and_is_named(tmp_path, caplog):
    layout = OutputLayout(str(tmp_path))
    record = {"name": "j", "status": "running", "started_at": "2026-01-01T00:00:00+00:00"}
    layout.write_json("_job.json", {**record, "shards_total": 2, "rows_total": 2, "fingerprint": {}})
    layout.prepare_shard("x")
    layout.write_json(OutputLayout.stats_path("x"), {"shard_id": "x", "ok": 1})
    layout.write_json(OutputLayout.stats_path("y"), {"shard_id": "y", "rows": 1, "ok": 1, "error": 0})
    status = job_status(str(tmp_path))
    assert (status.shards_done, status.ok) == (1, 1)  # y only: x is redone by the next run
    [warning] = [r.getMessage() for r in caplog.records if "shards/x.json" in r.getMessage()]
    assert "'rows'" in warning and "redone" in warning


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


def test_outputs_of_the_previous_version_are_read_by_status_report_and_a_resume(ray_session, tmp_path):
    """Two of three shards were committed by the previous imagemill: status and the report count them,
    and a resume runs only the third."""
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=12, row_group_size=4)
    spec = imagemill.build_spec(
        {
            "name": "old-output",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "noop"},
            "generation": {"width": 8, "height": 8},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )
    shards = plan_shards(spec.input).shards
    assert len(shards) == 3
    out = Path(spec.output.path)
    (out / "shards").mkdir(parents=True)
    for shard, ok in zip(shards[:2], (4, 3), strict=True):
        stats = old_stats(shard.shard_id, rows=4, ok=ok, input_file=shard.file_url)
        (out / "shards" / f"{shard.shard_id}.json").write_text(json.dumps(stats))

    result = imagemill.run(spec, progress=False)
    assert result.complete and result.shards_run == 1
    assert (result.ok, result.errors, result.errors_by_reason) == (11, 1, {"invalid_prompt": 1})
    assert "11 ok, 1 error" in job_status(str(out)).text()
    report = write_report(OutputLayout(str(out)))
    assert (report["counts"]["rows_done"], report["counts"]["rows_ok"]) == (12, 11)
    assert set(report["stage_seconds"]) >= {"read", "denoise", "idle"}  # the new shard's stages
    new = json.loads((out / "shards" / f"{shards[2].shard_id}.json").read_text())
    assert not set(DROPPED) & set(new) and set(new["stage_seconds"]) >= {"read", "idle"}
