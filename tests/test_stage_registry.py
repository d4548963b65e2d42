"""The actor's post-generation stages come from one table (imagemill.core.stage_table) and one registry
(workers/stages/registry.py): a new stage is its module, its row and its test, and nothing else changes.

The stage added here is a whole such stage: a class with the `Stage` attributes, registered through
the registry's public hook, run by a real worker on a real shard in process; its metadata column and
its seconds come out without any other module knowing it."""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Self

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_prompt_files
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.records import MODEL_STAGES, MetadataRow
from imagemill.core.spec import JobSpec
from imagemill.core.stage_table import ACTOR_STAGES, POST_GENERATION, StageRow
from imagemill.reporting.report import STAGE_LABELS
from imagemill.workers.stage_timer import STAGES
from imagemill.workers.stages import registry
from imagemill.workers.stages.contract import DrawBatch, StageContext

STAGE_ATTRIBUTES = ("section", "needs", "adds", "changes_pixels", "columns", "from_spec")  # contract.Stage


class MeanBrightness:
    """A test-only device stage: each draw's mean pixel value, as the metadata column `brightness`."""

    section = None
    needs = ("images",)
    adds = ()
    changes_pixels = False
    columns = ("brightness",)

    @classmethod
    def from_spec(cls, spec: JobSpec, context: StageContext) -> Self | None:
        return cls()

    def run(self, batch: DrawBatch) -> None:
        time.sleep(PAUSE)  # long enough to be seen in the stage seconds (rounded to the millisecond)
        means = batch.images.float().mean(dim=(1, 2, 3)).cpu().tolist()
        for columns, mean in zip(batch.columns, means, strict=True):
            columns["brightness"] = mean


PAUSE = 0.02  # seconds per chunk of draws
BRIGHTNESS = StageRow("brightness", "mean brightness (device)", "device")


@pytest.fixture
def brightness_stage():
    registry.register(BRIGHTNESS, MeanBrightness, before="copy_back")
    yield
    registry.unregister(BRIGHTNESS.name)


def _spec(tmp_path, tiny_model: str) -> JobSpec:
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=6, row_group_size=6)
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 6},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2},
            "workers": {"batch_size": 4},
        }
    )


def test_a_registered_stage_fills_its_column_and_its_stage_time(tmp_path, tiny_model, brightness_stage):
    from imagemill.testing.in_process import load_worker, run_shards

    worker = load_worker(_spec(tmp_path, tiny_model))
    [stats] = run_shards(worker)
    assert stats.ok == 6
    assert stats.stage_seconds["brightness"] >= 2 * PAUSE  # 6 rows in chunks of 4: two runs
    metadata = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    for row in metadata:  # the column is the mean of the very pixels written (PNG: lossless)
        written = np.asarray(Image.open(io.BytesIO((tmp_path / "out" / row["path"]).read_bytes())))
        assert row["brightness"] == pytest.approx(float(written.astype(np.float64).mean()), abs=1e-3)


def test_a_stage_that_needs_what_no_earlier_stage_adds_is_refused(tmp_path, tiny_model):
    registry.register(BRIGHTNESS, type("TooEarly", (MeanBrightness,), {"needs": ("pixels",)}), "copy_back")
    try:
        with pytest.raises(ValueError, match="stage brightness needs \\['pixels'\\]"):
            registry.build_stages(_spec(tmp_path, tiny_model), "cpu", generator=None)  # type: ignore[arg-type]
    finally:
        registry.unregister(BRIGHTNESS.name)


@given(st.sampled_from(POST_GENERATION))
def test_every_table_row_is_a_stage_whose_section_and_columns_exist(row: StageRow):
    stage = registry.stage_class(row)
    assert all(hasattr(stage, name) for name in STAGE_ATTRIBUTES)
    if hasattr(stage, "run"):  # run on each chunk of draws, between generate calls
        assert row.thread == "device"
    if stage.section is not None:  # a JobSpec section, dotted into sub-settings
        fields: dict = JobSpec.model_fields
        for part in stage.section.split("."):
            assert part in fields, stage.section
            annotation = fields[part].annotation
            fields = getattr(annotation, "model_fields", {}) or _model_fields_of_optional(annotation)
    # a column is MetadataRow's, or the stage's own, appended after them (ActorStages.new_columns):
    # then no other table stage may fill it
    known = {field.name for field in dataclasses.fields(MetadataRow)}
    for other in POST_GENERATION:
        if other != row:
            assert not (set(stage.columns) - known) & set(registry.stage_class(other).columns), row.name


def _model_fields_of_optional(annotation) -> dict:
    """`X | None` → X's pydantic fields (empty for a plain value)."""
    for arg in getattr(annotation, "__args__", ()):
        if hasattr(arg, "model_fields"):
            return arg.model_fields
    return {}


def test_stage_names_labels_and_model_stages_come_from_the_table():
    names = [row.name for row in ACTOR_STAGES]
    assert list(STAGES) == names and len(set(names)) == len(names)
    assert set(names) <= set(STAGE_LABELS)  # every stage has its report label
    assert set(MODEL_STAGES) == {row.name for row in ACTOR_STAGES if row.thread == "device"}
    assert {"text_encode", "denoise", "decode", "score", "copy_back"} <= set(MODEL_STAGES)
    assert "image_encode" not in MODEL_STAGES and "idle" not in MODEL_STAGES
