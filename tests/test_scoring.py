"""The CLIP score (scoring:) end to end: a tiny random CLIP model scores the tiny SD model's images on the
actor; the score column, the reference computed by hand, filtering (keep and drop), exactly-once
accounting, resume, and the score distribution in the report. The scored job and the first run of
`drop` go through Ray's actors; the rest run in process (testing.in_process: same driver and worker, same
bytes).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import check_output, prompt_table, read_metadata
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import run_in_process

SIZE = 64  # the tiny CLIP takes 32 pixels: the scorer resizes
ROWS = 12
# The scorer resizes with torch's antialiased bicubic (a = -0.75), the reference with PIL's (a = -0.5):
# pixels differ by a few levels, which moves this tiny model's scores (spread over ±50) by < 0.1.
SCORE_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    pq.write_table(prompt_table(ROWS), folder / "a.parquet", row_group_size=6)  # two shards of 6 rows
    return folder


def _spec(
    prompts_dir: Path, output: Path, tiny_model: str, scoring: dict, **output_extra
) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "name": output.name,
            "input": {"path": str(prompts_dir), "rows_per_shard": 6},
            "output": {"path": str(output), **output_extra},
            "model": {"source": tiny_model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 1, "seed": 5},
            "workers": {"num_workers": 1, "batch_size": 4},
            "scoring": scoring,
        }
    )


@dataclass
class ScoredJob:
    output: Path
    rows: dict[str, dict]  # metadata rows by id


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory, prompts_dir, tiny_model, tiny_clip) -> ScoredJob:
    """A job that scores without a threshold."""
    spec = _spec(prompts_dir, tmp_path_factory.mktemp("jobs") / "scored", tiny_model, {"source": tiny_clip})
    result = imagemill.run(spec, progress=False)
    assert (result.ok, result.filtered, result.errors) == (ROWS, 0, 0)
    rows = {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}
    return ScoredJob(Path(spec.output.path), rows)


def _scores(rows: dict[str, dict]) -> dict[str, float]:
    return {i: row["clip_score"] for i, row in rows.items() if row["clip_score"] is not None}


def _median_split(scored: ScoredJob) -> tuple[dict[str, float], float, set[str]]:
    """The scored job's scores, their median as a threshold, and the ids scoring under it."""
    reference = _scores(scored.rows)
    threshold = statistics.median(reference.values())
    low = {i for i, score in reference.items() if score < threshold}
    assert 0 < len(low) < len(reference)
    return reference, threshold, low


def test_score_column_matches_clip_computed_by_hand_on_the_written_images(scored, tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    output, ok = scored.output, scored.rows
    assert {row["status"] for row in ok.values()} == {"ok"}
    assert len(ok) == ROWS and all(math.isfinite(row["clip_score"]) for row in ok.values())
    assert len({row["clip_score"] for row in ok.values()}) == len(ok), "each image gets its own score"

    # The reference: transformers' own processor (PIL) and model, on the PNGs as written (lossless).
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    ids = sorted(ok)
    images = [Image.open(io.BytesIO((output / ok[i]["path"]).read_bytes())).convert("RGB") for i in ids]
    inputs = processor(
        text=[ok[i]["prompt"] for i in ids], images=images, return_tensors="pt", padding=True, truncation=True
    )
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    reference = 100 * torch.nn.functional.cosine_similarity(image, text.pooler_output).numpy()
    for i, expected in zip(ids, reference, strict=True):
        assert ok[i]["clip_score"] == pytest.approx(float(expected), abs=SCORE_TOLERANCE), i

    # The report's distribution, summed from the shards' histograms, agrees with the column.
    report = json.loads((output / "report.json").read_text())["clip_score"]
    scores = [row["clip_score"] for row in ok.values()]
    assert report["count"] == len(scores) and sum(b["count"] for b in report["bins"]) == len(scores)
    assert report["mean"] == pytest.approx(statistics.fmean(scores), abs=1e-3)
    assert (report["min"], report["max"]) == (
        pytest.approx(min(scores), abs=1e-3),
        pytest.approx(max(scores), abs=1e-3),
    )
    for b in report["bins"]:
        assert b["count"] == sum(b["low"] <= s < b["high"] for s in scores), b
    assert report["threshold"] is None
    assert 'id="clip-score"' in (output / "report.html").read_text()


def test_keep_marks_low_scores_filtered_and_writes_their_images(
    scored, tmp_path, prompts_dir, tiny_model, tiny_clip
):
    reference, threshold, low = _median_split(scored)
    # The same input plus a file whose only row has no prompt: an error row, in its own shard, so
    # the other shards' batches (and so images and scores) are those of the scored job.
    inputs = tmp_path / "prompts"
    inputs.mkdir()
    (inputs / "a.parquet").write_bytes((prompts_dir / "a.parquet").read_bytes())
    pq.write_table(pa.table({"id": ["bad"], "prompt": pa.array([None], pa.string())}), inputs / "b.parquet")
    spec = _spec(
        inputs,
        tmp_path / "keep",
        tiny_model,
        {"source": tiny_clip, "threshold": threshold, "on_low_score": "keep"},
        format="parquet",
    )
    result = run_in_process(spec)
    assert (result.ok, result.filtered, result.errors) == (ROWS - len(low), len(low), 1)
    assert f"{len(low)} filtered, 1 error" in result.summary()

    rows = {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}
    bad = rows.pop("bad")
    assert bad["status"] == "error" and bad["clip_score"] is None
    assert _scores(rows) == pytest.approx(reference), "the same images, so the same scores"
    assert {i for i, row in rows.items() if row["status"] == "filtered"} == low
    # `keep`: filtered rows' images are in the data files, with their status and score.
    data = pq.read_table(sorted((Path(spec.output.path) / "data").glob("*.parquet"))).to_pylist()
    assert {record["id"]: record["status"] for record in data} == {
        i: row["status"] for i, row in rows.items()
    }
    assert all(record["clip_score"] == rows[record["id"]]["clip_score"] for record in data)


def test_drop_writes_no_image_counts_once_and_a_resume_redoes_nothing(
    scored, ray_session, tmp_path, prompts_dir, tiny_model, tiny_clip, caplog
):
    reference, threshold, low = _median_split(scored)
    spec = _spec(
        prompts_dir,
        tmp_path / "drop",
        tiny_model,
        {"source": tiny_clip, "threshold": threshold, "on_low_score": "drop"},
    )
    counts = f"{ROWS - len(low)} ok, {len(low)} filtered, 0 error"
    caplog.set_level(logging.INFO, logger="imagemill.execution.runner")
    assert f"{ROWS} rows: {counts}" in imagemill.run(spec, progress=False).summary()
    per_shard = [int(n) for n in re.findall(r"shard \S+ done: \d+ rows, \d+ ok, (\d+) filtered", caplog.text)]
    assert sum(per_shard) == len(low), caplog.text  # each shard's INFO line counts its filtered rows

    out = Path(spec.output.path)
    hashes = check_output(str(out), set(reference), SIZE, SIZE)  # each id once, done; images as named
    rows = {row["id"]: row for row in read_metadata(str(out)).to_pylist()}
    assert set(hashes) == set(reference) - low
    dropped = {i for i, row in rows.items() if row["status"] == "filtered"}
    assert dropped == low and all(rows[i]["path"] is None and rows[i]["sha256"] is None for i in dropped)
    assert _scores(rows) == pytest.approx(reference)
    record = json.loads((out / "_job.json").read_text())
    assert (record["rows_ok"], record["rows_filtered"], record["rows_error"]) == (
        ROWS - len(low),
        len(low),
        0,
    )

    assert counts in job_status(str(out)).text()  # `imagemill status`

    # A shard lost its commit: the re-run redoes that shard only; the other's filtered rows stay done.
    shards = sorted((out / "shards").glob("*.json"))
    kept_shard = {path: path.stat().st_mtime_ns for path in (out / "metadata").glob("*.parquet")}
    shards[0].unlink()
    again = run_in_process(spec)
    assert again.shards_run == 1 and counts in again.summary()
    unchanged = [path for path, mtime in kept_shard.items() if path.stat().st_mtime_ns == mtime]
    assert [path.stem for path in unchanged] == [shards[1].stem]
    assert {row["id"]: row["status"] for row in read_metadata(str(out)).to_pylist()} == {
        i: row["status"] for i, row in rows.items()
    }


def test_scoring_source_is_checked_before_the_job_starts(tmp_path, prompts_dir, tiny_model):
    spec = _spec(prompts_dir, tmp_path / "out", tiny_model, {"source": str(tmp_path / "no-such-clip")})
    with pytest.raises(ImagemillError, match=r"scoring model path does not exist: .*\(scoring.source\)"):
        imagemill.run(spec, progress=False)


def test_scoring_settings_are_in_the_fingerprint(tmp_path, prompts_dir, tiny_model, tiny_clip):
    def fingerprint(scoring):
        return _spec(prompts_dir, tmp_path / "out", tiny_model, scoring).fingerprint()

    plain = fingerprint(None)
    assert plain["scoring"] is None
    variants = [
        {"source": tiny_clip},
        {"source": tiny_clip, "threshold": 20.0},
        {"source": tiny_clip, "threshold": 20.0, "on_low_score": "drop"},
    ]
    assert len({json.dumps(fingerprint(v), sort_keys=True) for v in variants} | {json.dumps(plain)}) == 4
    secret = {"source": tiny_clip, "storage_options": {"secret": "do-not-log"}}
    assert _spec(prompts_dir, tmp_path / "out", tiny_model, secret).redacted()["scoring"][
        "storage_options"
    ] == ("<redacted>")
    assert fingerprint(secret) == fingerprint({"source": tiny_clip}), "where the model is read from is not"
