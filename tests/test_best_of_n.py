"""Best-of-N (generation.candidates): k draws per row, seeds derived per draw, the best CLIP score kept.

The test draws and scores every candidate again by hand (diffusers' pipeline, transformers' CLIP and
its processor) and checks the choice; runs are in process (testing.in_process), deterministic and
byte-identical on resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import as_pixels, prompt_table, read_metadata
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.in_process import output_hashes as _files
from imagemill.testing.in_process import run_in_process
from imagemill.workers.seeds import draw_seed

SIZE = 32
ROWS = 6
CANDIDATES = 3
GENERATION = {"width": SIZE, "height": SIZE, "num_inference_steps": 2, "guidance_scale": 7.5}
SCORE_TOLERANCE = 0.3  # torch's bicubic resize against PIL's, and batch-size last bits (see test_scoring)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    pq.write_table(prompt_table(ROWS), folder / "a.parquet", row_group_size=3)  # two shards of 3 rows
    return folder


def _data(prompts_dir: Path, output: Path, tiny_model: str, tiny_clip: str | None, **generation) -> dict:
    return {
        "input": {"path": str(prompts_dir), "rows_per_shard": 3},
        "output": {"path": str(output)},
        "model": {"source": tiny_model},
        "generation": {**GENERATION, "seed": 11, "candidates": CANDIDATES, **generation},
        "workers": {"num_workers": 1, "batch_size": 4},  # 9 draws a shard: chunks mix rows
        "scoring": {"source": tiny_clip} if tiny_clip else None,
    }


@pytest.fixture(scope="module")
def best_of(tmp_path_factory, prompts_dir, tiny_model, tiny_clip) -> Path:
    spec = imagemill.build_spec(
        _data(prompts_dir, tmp_path_factory.mktemp("best") / "out", tiny_model, tiny_clip)
    )
    result = run_in_process(spec)
    assert (result.ok, result.errors) == (ROWS, 0)
    return Path(spec.output.path)


def _draws(row: dict) -> list[dict]:
    """Every draw of the row, the kept one included, in draw order."""
    kept = {"draw": row["draw"], "seed": row["seed"], "clip_score": row["clip_score"]}
    return sorted([kept, *json.loads(row["rejected_draws"])], key=lambda draw: draw["draw"])


def test_keeps_the_candidate_with_the_highest_score_recomputed_by_hand(best_of, tiny_model, tiny_clip):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    rows = read_metadata(str(best_of)).to_pylist()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    for row in rows:
        draws = _draws(row)
        assert [d["draw"] for d in draws] == list(range(CANDIDATES))
        row_seed = draws[0]["seed"]  # draw 0 is drawn from the row's own seed
        assert all(d["seed"] == draw_seed(row_seed, d["draw"]) for d in draws)
        assert len({d["seed"] for d in draws}) == CANDIDATES

        # Every candidate drawn and scored again, independently of imagemill.
        with torch.no_grad():
            images = pipe(
                prompt=[row["prompt"]] * CANDIDATES,
                negative_prompt=[""] * CANDIDATES,
                generator=[torch.Generator("cpu").manual_seed(d["seed"]) for d in draws],
                output_type="pt",
                **GENERATION,
            ).images
            pixels = as_pixels(images)
            inputs = processor(
                text=[row["prompt"]] * CANDIDATES, images=list(pixels), return_tensors="pt", padding=True
            )
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text = model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        by_hand = (100 * torch.nn.functional.cosine_similarity(image, text.pooler_output)).tolist()
        recorded = [d["clip_score"] for d in draws]
        assert recorded == pytest.approx(by_hand, abs=SCORE_TOLERANCE), row["id"]
        best = max(recorded)
        assert row["draw"] == recorded.index(best), "the max score, the lowest draw on a tie"
        assert by_hand[row["draw"]] >= max(by_hand) - 2 * SCORE_TOLERANCE

        written = np.asarray(Image.open(best_of / row["path"]).convert("RGB")).astype(int)
        distance = [np.abs(written - candidate.astype(int)).mean() for candidate in pixels]
        assert int(np.argmin(distance)) == row["draw"] and distance[row["draw"]] < 1, (
            "the file is the kept draw"
        )

    stats = [json.loads(path.read_text()) for path in (best_of / "shards").glob("*.json")]
    assert sum(s["rejected_candidates"] for s in stats) == ROWS * (CANDIDATES - 1)
    assert sum(s["redraws"] for s in stats) == ROWS * (CANDIDATES - 1)
    report = json.loads((best_of / "report.json").read_text())["counts"]
    assert (report["candidates_rejected"], report["rows_filtered"], report["rows_ok"]) == (
        ROWS * (CANDIDATES - 1),
        0,
        ROWS,
    )


def test_deterministic_and_resumes_byte_identical(tmp_path, best_of, prompts_dir, tiny_model, tiny_clip):
    spec = imagemill.build_spec(_data(prompts_dir, tmp_path / "again", tiny_model, tiny_clip))
    run_in_process(spec)
    output = Path(spec.output.path)
    assert _files(output) == _files(best_of)
    sorted((output / "shards").glob("*.json"))[-1].unlink()  # that shard never committed
    assert run_in_process(spec).shards_run == 1
    assert _files(output) == _files(best_of)


def test_candidates_are_in_the_fingerprint(tmp_path, prompts_dir, tiny_model, tiny_clip):
    data = _data(prompts_dir, tmp_path / "out", tiny_model, tiny_clip)
    assert imagemill.build_spec(data).fingerprint()["generation"]["candidates"] == CANDIDATES
    one = imagemill.build_spec({**data, "generation": GENERATION}).fingerprint()["generation"]
    assert one["candidates"] == 1


def test_refused_without_a_score_to_choose_by(tmp_path, prompts_dir):
    with pytest.raises(
        ImagemillError, match="candidates: 3 picks by clip_score, which needs a scoring: section"
    ):
        imagemill.build_spec(_data(prompts_dir, tmp_path / "out", "m", None))
    with pytest.raises(
        ImagemillError, match="'aesthetic' is not a selector imagemill has: the only one is clip_score"
    ):
        imagemill.build_spec(_data(prompts_dir, tmp_path / "out", "m", "clip", select_by="aesthetic"))
