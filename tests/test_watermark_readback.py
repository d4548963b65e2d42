"""The actor reads each watermark back from the file it encoded (issue #24 item 7): a job wrote 16 ok
images and `verify` found the watermark in 9, which nobody knew until then. Now each row records
`watermark_ok`, agreeing with what `verify` finds in its file, the shard stats, `_job.json` and the
report count the images it did not read back from, and `on_unreadable: retry` embeds it again with
headroom, so that most of those images carry it too.

Solid colours are what the noop generator draws; those near pure black or white cannot carry the
watermark as they are (provenance/watermark.py), as a generated image on a white background cannot.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagemill.core.records import MetadataRow
from imagemill.core.spec import JobSpec
from imagemill.provenance.encoder import ImageEncoder
from imagemill.provenance.parameters import ModelFacts
from imagemill.provenance.publication import Publication
from imagemill.provenance.verify import check_image, verify
from imagemill.testing.in_process import run_in_process

PAYLOAD = "nightly1"
ROW = MetadataRow(
    id="r",
    prompt="p",
    prompt_truncated=False,
    negative_prompt=None,
    seed=1,
    num_inference_steps=1,
    guidance_scale=1.0,
    width=256,
    height=256,
    status="ok",
    model="m",
    input_file="f",
    input_row=0,
)


# No parameters embedded: the read-back alone decides watermark_ok.
UNPUBLISHED = Publication.of("none", "", ModelFacts(None, None, None, [], "imagemill", {}))


def _output(image_format: str, on_unreadable: str) -> JobSpec:
    watermark = {"payload": PAYLOAD, "on_unreadable": on_unreadable}
    output = {
        "path": "/out",
        "image_format": image_format,
        "watermark": watermark,
        "embed_parameters": "none",
    }
    return JobSpec.model_validate({"input": {"path": "/in"}, "output": output, "model": {"kind": "noop"}})


@settings(max_examples=12)
@given(
    colour=st.tuples(*[st.integers(0, 255)] * 3),
    image_format=st.sampled_from(["png", "jpeg", "webp"]),
    on_unreadable=st.sampled_from(["mark", "retry"]),
)
def test_watermark_ok_is_what_verify_finds_in_the_written_file(colour, image_format, on_unreadable):
    spec = _output(image_format, on_unreadable)
    pixels = np.full((256, 256, 3), colour, dtype=np.uint8)
    encoded = ImageEncoder(spec.output, UNPUBLISHED, None).encode(pixels, ROW)
    assert encoded.watermark_ok is check_image("f", encoded.data, PAYLOAD).watermark_found


def test_white_is_unreadable_as_it_is_and_readable_after_a_retry():
    white = np.full((256, 256, 3), 255, dtype=np.uint8)
    for image_format in ("png", "jpeg", "webp"):
        kept = ImageEncoder(_output(image_format, "mark").output, UNPUBLISHED, None).encode(white, ROW)
        retried = ImageEncoder(_output(image_format, "retry").output, UNPUBLISHED, None).encode(white, ROW)
        assert (kept.watermark_ok, retried.watermark_ok) == (False, True), image_format
        assert check_image("f", retried.data, PAYLOAD).watermark_found


def _job(tmp_path, on_unreadable: str) -> JobSpec:
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(16)]}), prompts, row_group_size=8)
    return JobSpec.model_validate(
        {
            "input": {"path": str(prompts), "rows_per_shard": 8},
            "output": {
                "path": str(tmp_path / f"out-{on_unreadable}"),
                "image_format": "webp",
                "watermark": {"payload": PAYLOAD, "on_unreadable": on_unreadable},
            },
            "model": {"kind": "noop"},
            "generation": {"width": 256, "height": 256, "seed": 3},
            "workers": {"batch_size": 8},
        }
    )


@pytest.mark.slow
def test_a_job_records_and_counts_the_images_its_watermark_did_not_read_back_from(tmp_path):
    unreadable = {}
    for policy in ("mark", "retry"):
        spec = _job(tmp_path, policy)
        out = tmp_path / f"out-{policy}"
        result = run_in_process(spec)
        metadata = pq.read_table(out / "metadata").to_pylist()
        not_ok = sum(row["watermark_ok"] is False for row in metadata)
        assert all(row["watermark_ok"] is not None for row in metadata)
        report = verify([str(out / "images")])
        found = sum(bool(check.watermark_found) for check in report.checks)
        assert (found, not_ok) == (16 - not_ok, 16 - found)  # the actor's word is verify's
        record = json.loads((out / "_job.json").read_text())
        counts = json.loads((out / "report.json").read_text())["counts"]
        assert record["rows_watermark_unreadable"] == counts["rows_watermark_unreadable"] == not_ok
        assert result.watermark_unreadable == not_ok
        assert record["rows_ok"] == 16  # mark and retry: every image is written, status ok
        unreadable[policy] = not_ok
    # seeded: 4 of the 16 colours have a channel near 0 or 255; the retry's headroom brings back 3 (the
    # fourth, a flat orange, loses it to WebP's chroma quantisation, not to clipping)
    assert 0 <= unreadable["retry"] < unreadable["mark"]


def test_keep_reads_nothing_back_and_marks_nothing():
    """`keep`: the watermark is embedded as with `mark`, but no read-back is paid for: `watermark_ok`
    is empty, not false, even for an image (pure white) it would not read back from."""
    white = np.full((256, 256, 3), 255, dtype=np.uint8)
    kept = ImageEncoder(_output("png", "keep").output, UNPUBLISHED, None).encode(white, ROW)
    marked = ImageEncoder(_output("png", "mark").output, UNPUBLISHED, None).encode(white, ROW)
    assert (kept.watermark_ok, marked.watermark_ok) == (None, False)
    assert kept.data == marked.data  # the same file either way: only the read-back differs
