"""The safety filter (safety:) end to end: a tiny safety checker whose concept threshold flags known rows;
each policy's files, metadata, counts and report thumbnails; retry's seeds, determinism and resume; one
run through Ray that must write the bytes the in-process run wrote.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import prompt_table, read_metadata
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.images import thumbnail_data_uri
from imagemill.reporting.status import job_status
from imagemill.testing.in_process import output_hashes as _files
from imagemill.testing.in_process import run_in_process
from imagemill.workers.seeds import draw_seed
from imagemill.workers.stages.safety import blur

SIZE = 32
ROWS = 8


@pytest.fixture(scope="module")
def models(tiny_model, tiny_clip) -> dict[str, str]:
    return {"sd": tiny_model, "clip": tiny_clip}


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    pq.write_table(prompt_table(ROWS), folder / "a.parquet", row_group_size=4)  # two shards of 4 rows
    return folder


def _checker(folder: Path, clip: str, threshold: float, share_tower: bool = True) -> str:
    from imagemill.testing.tiny_safety import make_tiny_safety_checker

    name = f"checker-{threshold:.6f}-{share_tower}"
    return str(make_tiny_safety_checker(folder / name, clip, threshold, share_tower))


def _spec(prompts_dir: Path, output: Path, models: dict[str, str], safety: dict, scoring: bool = True):
    return imagemill.build_spec(
        {
            "name": output.name,
            "input": {"path": str(prompts_dir), "rows_per_shard": 4},
            "output": {"path": str(output)},
            "model": {"source": models["sd"]},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2, "seed": 3},
            "workers": {"num_workers": 1, "batch_size": 3},
            "scoring": {"source": models["clip"]} if scoring else None,
            "safety": safety,
        }
    )


def _rows(output: Path | str) -> dict[str, dict]:
    return {row["id"]: row for row in read_metadata(str(output)).to_pylist()}


def _pixels(output: Path | str, row: dict) -> np.ndarray:
    return np.asarray(Image.open(Path(output) / row["path"]).convert("RGB"))


@dataclass
class Probe:
    """What the checker sees in each row's first image: its cosine with concept 0, and the image."""

    output: Path
    cosine: dict[str, float]
    threshold: float  # between the cosines: the rows above it flag
    flagged: set[str]


@pytest.fixture(scope="module")
def probe(tmp_path_factory, prompts_dir, models) -> Probe:
    """A keep run with threshold 0: every `safety_score` is then the row's cosine with concept 0."""
    folder = tmp_path_factory.mktemp("probe")
    checker = _checker(folder, models["clip"], 0.0)
    spec = _spec(prompts_dir, folder / "out", models, {"source": checker, "policy": "keep"})
    run_in_process(spec)
    cosine = {row_id: row["safety_score"] for row_id, row in _rows(spec.output.path).items()}
    ordered = sorted(cosine.values())
    assert len(set(ordered)) == ROWS, "the tiny checker must tell the rows apart"
    threshold = statistics.mean(ordered[ROWS // 2 - 1 : ROWS // 2 + 1])  # the upper half flags
    return Probe(Path(spec.output.path), cosine, threshold, {i for i, c in cosine.items() if c > threshold})


@pytest.fixture(scope="module")
def checker(tmp_path_factory, models, probe) -> str:
    return _checker(tmp_path_factory.mktemp("checker"), models["clip"], probe.threshold)


def _report(output: Path) -> dict:
    return json.loads((output / "report.json").read_text())


def _thumbnails(output: Path) -> dict[str, str]:
    """The report's sample thumbnails by id, as the stats carry them (report.html shows these)."""
    thumbnails = {}
    for stats in (output / "shards").glob("*.json"):
        for sample in json.loads(stats.read_text())["samples"]:
            thumbnails[sample["id"]] = sample["thumbnail"]
    return thumbnails


def _check_counts(output: Path, result: imagemill.JobResult, flagged: int) -> None:
    assert result.flagged == flagged and result.ok + result.flagged == ROWS and result.errors == 0
    assert f"{flagged} flagged" in result.summary()
    record = json.loads((output / "_job.json").read_text())
    assert record["rows_flagged"] == flagged and record["status"] == "complete"
    assert _report(output)["counts"]["rows_flagged"] == flagged
    assert f"{flagged} flagged" in job_status(str(output)).text()
    assert 'id="count-flagged-rows-safety"' in (output / "report.html").read_text()


@pytest.mark.parametrize("policy", ["keep", "blur", "drop"])
def test_each_policy_end_to_end(tmp_path, prompts_dir, models, probe, checker, policy):
    spec = _spec(prompts_dir, tmp_path / policy, models, {"source": checker, "policy": policy})
    result = run_in_process(spec)
    output = Path(spec.output.path)
    rows, first = _rows(output), _rows(probe.output)
    _check_counts(output, result, len(probe.flagged))
    thumbnails = _thumbnails(output)
    assert thumbnails, "the report shows samples"
    for row_id, row in rows.items():
        flagged = row_id in probe.flagged
        assert row["status"] == ("flagged" if flagged else "ok")
        assert (row["safety_score"] > 0) == flagged
        assert row["safety_concepts"] == ("concept_0" if flagged else None)
        assert row["safety_score"] == pytest.approx(probe.cosine[row_id] - probe.threshold, abs=1e-6)
        assert (row["seed"], row["draw"], row["rejected_draws"]) == (first[row_id]["seed"], 0, None)
        original = _pixels(probe.output, first[row_id])  # the probe kept every image as drawn
        if flagged and policy == "drop":
            assert row["path"] is None and row["sha256"] is None
            assert row_id not in thumbnails
            continue
        written = _pixels(output, row)
        hidden = blur(torch.from_numpy(original.copy()[None])).numpy()[0]
        expected = hidden if flagged and policy == "blur" else original
        np.testing.assert_array_equal(written, expected)
        assert hashlib.sha256((output / row["path"]).read_bytes()).hexdigest() == row["sha256"]
        if row_id in thumbnails:  # a flagged image's thumbnail is blurred, whatever the policy
            assert thumbnails[row_id] == thumbnail_data_uri(hidden if flagged else original)
    if policy == "drop":
        on_disk = {p.stem for p in (output / "images").rglob("*.png")}
        assert on_disk == set(rows) - probe.flagged
    shown = [sample["id"] for sample in _report(output)["samples"]]
    assert set(shown) <= set(thumbnails)


RETRY = {"policy": "retry", "retry": {"attempts": 2, "then": "blur"}}


@pytest.fixture(scope="module")
def retried(tmp_path_factory, prompts_dir, models, checker) -> Path:
    spec = _spec(prompts_dir, tmp_path_factory.mktemp("retry") / "out", models, {"source": checker, **RETRY})
    result = run_in_process(spec)
    assert result.ok + result.flagged == ROWS
    return Path(spec.output.path)


def test_retry_draws_again_from_derived_seeds_and_records_the_seed_used(retried, probe):
    rows, first = _rows(retried), _rows(probe.output)
    rescued = 0
    for row_id, row in rows.items():
        row_seed = first[row_id]["seed"]  # the probe drew every row once, from its own seed
        assert row["seed"] == draw_seed(row_seed, row["draw"])
        if row_id not in probe.flagged:
            assert (row["status"], row["draw"], row["rejected_draws"]) == ("ok", 0, None)
            # the same image; the bytes differ where the embedded parameters carry this job's safety_score
            assert np.array_equal(_pixels(retried, row), _pixels(probe.output, first[row_id]))
            continue
        rejected = json.loads(row["rejected_draws"])
        assert [draw["draw"] for draw in rejected] == [n for n in range(3) if n != row["draw"]][
            : len(rejected)
        ]
        assert all(draw["seed"] == draw_seed(row_seed, draw["draw"]) for draw in rejected)
        assert all(draw["safety_score"] > 0 for draw in rejected), "only flagged draws are drawn again"
        if row["status"] == "ok":  # a new seed drew an image the checker passes
            rescued += 1
            assert row["draw"] >= 1 and row["safety_score"] <= 0 and len(rejected) == row["draw"]
        else:  # flagged on every attempt: retry.then (blur) applies to the best flagged draw
            assert row["status"] == "flagged" and len(rejected) == 2 and row["safety_score"] > 0
    assert rescued, "the tiny checker passes some retried draws"
    stats = [json.loads(path.read_text()) for path in (retried / "shards").glob("*.json")]
    total = sum(len(json.loads(row["rejected_draws"] or "[]")) for row in rows.values())
    assert sum(s["redraws"] for s in stats) == total and sum(s["rejected_candidates"] for s in stats) == 0


def test_retry_through_ray_writes_the_same_bytes_and_resumes_byte_identical(
    ray_session, tmp_path, prompts_dir, models, checker, retried
):
    """The same spec through Ray actors (a re-run, on another path), then a resume of half the job."""
    spec = _spec(prompts_dir, tmp_path / "out", models, {"source": checker, **RETRY})
    result = imagemill.run(spec, progress=False)
    output = Path(spec.output.path)
    assert (result.ok, result.flagged) == (
        _report(retried)["counts"]["rows_ok"],
        _report(retried)["counts"]["rows_flagged"],
    )
    assert _files(output) == _files(retried)
    before = _files(output)
    stats_file = sorted((output / "shards").glob("*.json"))[0]
    stats_file.unlink()  # as if the run was killed before this shard committed
    resumed = run_in_process(spec)
    assert resumed.shards_run == 1 and _files(output) == before


def test_spec_refuses_a_changed_safety_setting_on_resume(prompts_dir, models, checker, retried):
    spec = _spec(prompts_dir, retried, models, {"source": checker, "policy": "retry"})  # then: drop now
    assert spec.fingerprint()["safety"]["retry"]["then"] == "drop"
    with pytest.raises(ImagemillError, match="safety"):
        imagemill.run(spec, progress=False)


def test_a_checker_without_the_scorers_tower_computes_its_own_embeddings(
    tmp_path, prompts_dir, models, probe
):
    """No scoring section and a checker with its own random tower: the checker runs its tower itself."""
    checker = _checker(tmp_path, models["clip"], 0.0, share_tower=False)
    spec = _spec(prompts_dir, tmp_path / "out", models, {"source": checker, "policy": "keep"}, scoring=False)
    run_in_process(spec)
    rows = _rows(spec.output.path)
    scores = [row["safety_score"] for row in rows.values()]
    assert all(row["clip_score"] is None for row in rows.values()) and len(set(scores)) == ROWS
    assert scores != [probe.cosine[row_id] for row_id in rows]  # another tower, other embeddings


def test_the_checker_reuses_the_scorers_embeddings_only_for_the_same_tower(tmp_path, models, checker):
    """Same weights and image processor: the scorer's embeddings give the checker's own verdicts."""
    from imagemill.core.spec import SafetySpec, ScoringSpec
    from imagemill.workers.stages.safety import SafetyChecker
    from imagemill.workers.stages.scoring import ClipScorer

    scorer = ClipScorer(ScoringSpec(source=models["clip"]), "cpu")
    shared = SafetyChecker(SafetySpec(source=checker), "cpu", scorer)
    other = _checker(tmp_path, models["clip"], 0.0, share_tower=False)
    assert shared.reuses_scorer and not SafetyChecker(SafetySpec(source=other), "cpu", scorer).reuses_scorer
    images = torch.randint(
        0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    reused = shared.check(images, scorer.image_embeddings(images))
    assert [v.score for v in reused] == pytest.approx([v.score for v in shared.check(images)], abs=1e-6)


# --- issue #23 item 6: after the safety stage, nothing of a flagged image's drawn pixels is anywhere ---

DATA_URI = re.compile(rb"data:image/[a-z]+;base64,([A-Za-z0-9+/=]+)")


def _small(pixels: np.ndarray) -> np.ndarray:
    """An image as the `pixels` feature model sees it: 16x16 by area, centred (evaluation.PixelFeatures)."""
    from imagemill.core.spec import EvaluationSpec
    from imagemill.workers.stages.evaluation import FeatureModel

    return FeatureModel(EvaluationSpec(features="pixels"), "cpu").embed(
        torch.from_numpy(pixels.copy()[None])
    )[0]


def _found_in(path: Path, data: bytes) -> tuple[list[np.ndarray], list[np.ndarray], set[str]]:
    """Every image (decoded), every embedding (float vector) and every id-like string a file holds:
    image files, Parquet columns (image bytes, embeddings, strings), tar members, JSON/HTML data URIs."""
    import io
    import tarfile

    from imagemill.core.images import InvalidImage, decode_image

    images, vectors, strings = [], [], set()

    def image(blob: bytes) -> None:
        try:
            images.append(np.asarray(decode_image(blob).convert("RGB")))
        except InvalidImage:
            for match in DATA_URI.finditer(blob):
                image(base64.b64decode(match.group(1)))

    def value(item) -> None:
        if isinstance(item, bytes):
            image(item)
        elif isinstance(item, str):
            strings.add(item)
            image(item.encode())
        elif isinstance(item, dict):
            for inner in item.values():
                value(inner)
        elif isinstance(item, list) and item and all(isinstance(x, float) for x in item):
            vectors.append(np.asarray(item, dtype=np.float32))
        elif isinstance(item, list):
            for inner in item:
                value(inner)

    if path.suffix == ".parquet":
        for column in pq.read_table(io.BytesIO(data)).to_pydict().values():
            value(column)
    elif path.suffix == ".tar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                strings.add(member.name)
                found = _found_in(Path(member.name), tar.extractfile(member).read())
                images += found[0]
                vectors += found[1]
                strings |= found[2]
    else:
        strings.add(path.name)
        image(data)
    return images, vectors, strings


def _tiles(sheet: Image.Image, side: int, count: int) -> list[np.ndarray]:
    """The contact sheet's images, cut back out at their own size (contact_sheet's layout)."""
    from imagemill.reporting.contact_sheet import CAPTION_LINES, GAP, LINE_HEIGHT

    scale, pixels = 4, np.asarray(sheet)
    cell_w, cell_h = side * scale + GAP, side * scale + CAPTION_LINES * LINE_HEIGHT + 2 * GAP
    tiles = []
    for i in range(count):
        x, y = GAP + (i % 8) * cell_w, GAP + (i // 8) * cell_h
        tiles.append(pixels[y : y + side * scale : scale, x : x + side * scale : scale])
    return tiles


@pytest.mark.parametrize(
    ("policy", "output_format"), [("blur", "files"), ("blur", "webdataset"), ("drop", "parquet")]
)
def test_no_file_of_the_output_holds_a_flagged_image_as_drawn(
    tmp_path, prompts_dir, models, probe, checker, policy, output_format
):
    """Every file of the output (images, tars, Parquet data, metadata, embeddings and feature stats,
    shard stats with the report's thumbnails, report.json/html, the contact sheet) is walked for a
    copy of a flagged image as it was drawn (the probe's keep run wrote each unblurred): none is
    there, not even 16x16, and a dropped row has no image, embedding or sample key at all."""
    spec = imagemill.build_spec(
        {
            **_spec(
                prompts_dir, tmp_path / "out", models, {"source": checker, "policy": policy}
            ).model_dump(),
            "output": {"path": str(tmp_path / "out"), "format": output_format},
            "evaluation": {"features": "pixels"},
        }
    )
    result = run_in_process(spec)
    assert result.flagged == len(probe.flagged) > 0
    output = Path(spec.output.path)
    drawn = {row_id: _pixels(probe.output, row) for row_id, row in _rows(probe.output).items()}
    images, vectors, strings = [], [], set()
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        found = _found_in(path, path.read_bytes())
        images, vectors, strings = images + found[0], vectors + found[1], strings | found[2]
    if output_format == "files":
        shown = [row for row in _rows(output).values() if row["status"] == "ok"]
        from imagemill.reporting.contact_sheet import contact_sheet

        images += _tiles(contact_sheet(str(output)), SIZE, len(shown))
    assert images and vectors, "the walk reads the output's images and embeddings"
    embeddings = pq.read_table(output / "embeddings").to_pydict()
    for row_id in probe.flagged:
        original = _small(drawn[row_id])
        hidden = blur(torch.from_numpy(drawn[row_id].copy()[None])).numpy()[0]
        margin = float(np.abs(_small(hidden) - original).max()) / 2  # what the blur moved, halved
        assert margin > 0.01
        for image in images:
            assert float(np.abs(_small(image) - original).max()) > margin, f"{row_id} as drawn"
        for vector in vectors:
            assert vector.shape != original.shape or float(np.abs(vector - original).max()) > margin, row_id
        if policy == "drop":
            assert row_id not in embeddings["id"]
            assert not any(row_id in text for text in strings if text != row_id), f"{row_id} left a trace"
        else:  # the embedding written is the blurred image's: the one the file holds
            at = embeddings["id"].index(row_id)
            np.testing.assert_allclose(embeddings["embedding"][at], _small(hidden), atol=2e-3)
