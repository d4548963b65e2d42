"""`input.format: images` (issue #25 acceptance 2): a bare folder, glob or bucket prefix of images, no
Parquet, enhanced with `model.kind: none`; the listing frozen in the output so that each image is done
exactly once across runs, and every bad source an `invalid_image` row."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_bucket, read_metadata
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout, image_name
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.executor import ShardWork
from imagemill.planning.image_listing import list_images, plan_listing, write_listing
from imagemill.planning.shards import plan_shards
from imagemill.testing.in_process import InThisProcess, run_in_process

SIZE = 16
MAX_PIXELS = 400


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _spec(path: str, output: str, **input_settings) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "input": {"path": path, "format": "images", "max_image_pixels": MAX_PIXELS} | input_settings,
            "output": {"path": output, "format": "files", "image_format": "png"},
            "model": {"kind": "none"},
            "generation": {"width": SIZE, "height": SIZE},
            "workers": {"batch_size": 4},
        }
    )


# Good sources, by relative path: each must come back as its own pixels (kind none draws nothing).
# A JPEG named .png is fine: a source is decoded by its content, never by its name.
GOOD = {
    "a.png": "PNG",
    "sub/deeper/cat 01.jpg": "JPEG",
    "sub/été #2 [x]*?.WEBP": "WEBP",
    "jpeg-named.png": "JPEG",
    "b.bmp": "BMP",
}
BAD = {
    "truncated.png": "does not decode|not an image",
    "text.png": "not an image",
    "empty.png": "empty",
    "too-big.png": "max_image_pixels",
    "link-out.png": "leaves the image folder",
    "fifo.png": "not a regular file",
}
SKIPPED = ("README.txt", "_SUCCESS", "sub/notes.md")


def _make_folder(root: Path) -> Path:
    """A folder of good and bad images, and files that are no images, next to one outside it."""
    folder = root / "photos"
    for index, (name, fmt) in enumerate(GOOD.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_encoded(_pixels(index), fmt))
    (folder / "truncated.png").write_bytes(_encoded(_pixels(9), "PNG")[:100])
    (folder / "text.png").write_text("<html><script>alert(1)</script></html>")
    (folder / "empty.png").write_bytes(b"")
    (folder / "too-big.png").write_bytes(_encoded(np.zeros((21, 20, 3), np.uint8), "PNG"))  # 420 px
    (root / "outside.png").write_bytes(_encoded(_pixels(8), "PNG"))
    (folder / "link-out.png").symlink_to(root / "outside.png")
    os.mkfifo(folder / "fifo.png")
    for name in SKIPPED:
        (folder / name).write_text("not an image")
    return folder


def _rows(output: str) -> dict[str, dict]:
    return {row["source_image"]: row for row in read_metadata(output).to_pylist()}


def _check(output: str, good: dict[str, bytes], bad: dict[str, str]) -> None:
    """One image per good source (its own pixels, named from its path), one invalid_image row per bad;
    `good`: each source's bytes."""
    rows = _rows(output)
    assert set(rows) == set(good) | set(bad)
    for name in good:
        row = rows[name]
        assert (row["status"], row["id"]) == ("ok", name)
        assert row["path"].rpartition("/")[2] == f"{image_name(name)}.png"
        written = np.asarray(Image.open(Path(output) / row["path"]).convert("RGB"))
        expected = np.asarray(Image.open(io.BytesIO(good[name])).convert("RGB"))
        assert np.array_equal(written, expected), name
    for name, detail in bad.items():
        row = rows[name]
        assert row["status"] == "error" and row["path"] is None, row
        assert row["error"].startswith("invalid_image: ") and re.search(detail, row["error"]), row["error"]


def _hashes(output: Path) -> dict[str, str]:
    """Every file of the output but the run's own records (job record, report), by path."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output.rglob("*"))
        if path.is_file() and path.name not in ("_job.json", "report.json", "report.html")
    }


class _BeforeShards(InThisProcess):
    """The in-process executor, doing `action` once the run has written its listing, before any shard."""

    def __init__(self, action):
        self.action = action

    def __call__(self, work: ShardWork) -> None:
        self.action()
        super().__call__(work)


def test_a_folder_of_images_is_enhanced_and_each_bad_source_is_an_invalid_image_row(tmp_path):
    folder = _make_folder(tmp_path)
    output = tmp_path / "out"
    result = run_in_process(_spec(str(folder), str(output)))
    assert (result.ok, result.errors_by_reason) == (len(GOOD), {"invalid_image": len(BAD)})
    good = {name: _encoded(_pixels(index), fmt) for index, (name, fmt) in enumerate(GOOD.items())}
    _check(str(output), good, BAD)
    listing = pq.read_table(output / "_input" / "listing-00000.parquet")
    assert listing.column("image").to_pylist() == sorted([*GOOD, *BAD])  # README.txt, _SUCCESS: skipped


def test_a_rerun_is_a_no_op_and_new_images_alone_are_done_next(tmp_path):
    """Exactly once across runs: the listing is frozen in the output. A re-run changes no byte; two
    new images make a new listing and only they are done; an image listed and then gone, or swapped
    for a link out of the folder before its shard ran, is an invalid_image row; a listing planted by
    hand cannot lead a read out of the folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(_encoded(_pixels(seed), "PNG"))
    output = tmp_path / "out"
    spec = _spec(str(folder), str(output))
    run_in_process(spec)
    before = _hashes(output)
    again = run_in_process(spec)
    assert (again.shards_run, again.ok) == (0, 3)
    assert _hashes(output) == before  # the listing too: nothing new, nothing written

    for seed in (3, 4, 5):
        (folder / f"{seed}.png").write_bytes(_encoded(_pixels(seed), "PNG"))
    (tmp_path / "outside.png").write_bytes(_encoded(_pixels(9), "PNG"))

    def vanish_and_swap() -> None:  # after the listing is written, before the new shards run
        (folder / "4.png").unlink()
        (folder / "5.png").unlink()
        (folder / "5.png").symlink_to(tmp_path / "outside.png")

    third = imagemill.run(spec, progress=False, executor=_BeforeShards(vanish_and_swap))
    assert third.rows_run == 3 and third.ok == 4
    after = _hashes(output)
    assert {path: digest for path, digest in after.items() if path in before} == before  # old shards kept
    new_listing = pq.read_table(output / "_input" / "listing-00001.parquet").column("image").to_pylist()
    assert new_listing == ["3.png", "4.png", "5.png"]
    _check(
        str(output),
        {f"{seed}.png": _encoded(_pixels(seed), "PNG") for seed in range(4)},
        {"4.png": "not found", "5.png": "leaves the image folder"},
    )

    planted = pa.table({"id": ["evil"], "image": ["../outside.png"]})
    pq.write_table(planted, output / "_input" / "listing-00002.parquet")
    fourth = run_in_process(spec)
    assert fourth.errors_by_reason == {"invalid_image": 3}
    assert (
        _rows(str(output))["../outside.png"]["error"]
        == "invalid_image: '../outside.png' leaves the image folder"
    )

    fresh = run_in_process(spec, overwrite=True)  # deletes the listings with the rest: one new one
    assert (fresh.ok, fresh.errors_by_reason) == (4, {"invalid_image": 1})
    assert sorted(path.name for path in (output / "_input").iterdir()) == ["listing-00000.parquet"]


def test_on_ray_the_listing_is_read_in_pieces_and_a_rerun_runs_nothing(ray_session, tmp_path):
    """Real actors: one listing of six images cut into pieces of two rows, served by the run's
    PieceServer from the output; the same job run again has nothing to do."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(6):
        (folder / f"{seed}.png").write_bytes(_encoded(_pixels(seed), "PNG"))
    spec = _spec(str(folder), str(tmp_path / "out"), rows_per_shard=2)
    spec = spec.model_copy(update={"workers": spec.workers.model_copy(update={"num_workers": 1})})
    first = imagemill.run(spec, progress=False)
    assert (first.ok, first.shards_total) == (6, 3)
    _check(str(tmp_path / "out"), {f"{seed}.png": _encoded(_pixels(seed), "PNG") for seed in range(6)}, {})
    assert imagemill.run(spec, progress=False).shards_run == 0


def test_a_listing_another_run_wrote_after_this_one_listed_is_never_replaced(tmp_path):
    """Two runs of a job at once: the lease lets one hold the output at a time, but both may list the
    folder before either holds it. The later writer's listing of other images is refused, naming it;
    the first one's stays as it was."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(_encoded(_pixels(0), "PNG"))
    spec = _spec(str(folder), str(tmp_path / "out"))
    layout = OutputLayout(spec.output.path)
    late = plan_shards(spec.input, listing=plan_listing(spec.input, layout, overwrite=False))
    (folder / "b.png").write_bytes(_encoded(_pixels(1), "PNG"))
    owned = OwnedOutput.unleased(layout)
    other = plan_shards(spec.input, listing=plan_listing(spec.input, layout, overwrite=False))
    write_listing(owned, other)  # lists a.png and b.png
    written = (tmp_path / "out" / "_input" / "listing-00000.parquet").read_bytes()
    with pytest.raises(
        ImagemillError, match=r"listing-00000.parquet was written by another run .*; run again"
    ):
        write_listing(owned, late)
    assert (tmp_path / "out" / "_input" / "listing-00000.parquet").read_bytes() == written
    write_listing(owned, other)  # the same bytes again: not a conflict


NAME_CHARS = st.sampled_from([*"ab Z09._-#[]*?!{}()&'%+,;=~@$^", "é", "猫", "\u00a0", "\U0001f600"])


@settings(max_examples=25, deadline=None)
@given(names=st.sets(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=1, max_size=6))
def test_hostile_names_are_listed_exactly_by_a_folder_and_by_a_glob(tmp_path_factory, names):
    """Spaces, unicode, '#', '[', '*', '?' in file names: a folder lists each image once, as it is
    named; a glob's characters are only the spec's, never the files'; and every id gets its own file
    name in the output."""
    folder = tmp_path_factory.mktemp("hostile") / "photos"
    (folder / "sub [1]").mkdir(parents=True)
    files = {f"{name}.png" for name in names if name not in (".", "..")} | {f"sub [1]/{n}.JPG" for n in names}
    for name in files:
        (folder / name).write_bytes(b"x")
        (folder / f"{name}.txt").write_bytes(b"x")
    assert list_images(_spec(str(folder), "/unused").input) == sorted(files)
    globbed = list_images(_spec(f"{folder}/*.png", "/unused").input)
    assert globbed == sorted(name for name in files if "/" not in name)
    assert len({image_name(name).lower() for name in files}) == len(files)


def test_settings_that_do_not_apply_to_a_folder_of_images_are_refused_in_one_line(tmp_path):
    base = {"input": {"path": str(tmp_path), "format": "images"}, "output": {"path": str(tmp_path / "o")}}
    for setting in ("prompt_column", "image_column", "mask_column"):
        spec = base | {"input": base["input"] | {setting: "x"}, "model": {"kind": "none"}}
        with pytest.raises(
            ImagemillError, match=f"input.{setting}: 'x' does not apply to input.format: images"
        ):
            imagemill.build_spec(spec)
    with pytest.raises(
        ImagemillError, match="input.format: images has no prompts, so it takes model.kind: none"
    ):
        imagemill.build_spec(base | {"model": {"kind": "diffusers", "source": "m"}})


def test_a_file_an_empty_folder_and_an_output_inside_the_folder_are_refused(tmp_path):
    image = tmp_path / "photos" / "a.png"
    image.parent.mkdir()
    image.write_bytes(_encoded(_pixels(0), "PNG"))
    with pytest.raises(ImagemillError, match=r"is a file; with input.format: images it names a folder"):
        run_in_process(_spec(str(image), str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no images")
    with pytest.raises(ImagemillError, match=r"no images found at .*empty \(input.format: images takes"):
        run_in_process(_spec(str(tmp_path / "empty"), str(tmp_path / "out")))
    with pytest.raises(ImagemillError, match="is inside the input folder"):
        run_in_process(_spec(str(tmp_path / "photos"), str(tmp_path / "photos" / "out")))
    with pytest.raises(ImagemillError, match="input glob .* matches files the job writes"):
        run_in_process(_spec(f"{tmp_path}/photos/**/*.png", str(tmp_path / "photos" / "out")))
    assert not (tmp_path / "photos" / "out").exists() and not (tmp_path / "out").exists()


def test_an_s3_prefix_of_images_is_enhanced_into_an_s3_output(s3_endpoint, tmp_path):
    """The prefix listed through s3fs (hostile names, `_SUCCESS` skipped), its listing written
    create-only into the output's bucket (a conditional PUT) and read back by the worker."""
    import s3fs

    bucket = make_bucket("image-folder")
    fs = s3fs.S3FileSystem()
    names = {"a.png": 0, "sub/cat 01#[1].png": 1}
    for name, seed in names.items():
        fs.pipe_file(f"{bucket}/photos/{name}", _encoded(_pixels(seed), "PNG"))
    fs.pipe_file(f"{bucket}/photos/bad.png", b"not an image")
    fs.pipe_file(f"{bucket}/photos/_SUCCESS", b"")
    output = f"{bucket}/out"
    result = run_in_process(_spec(f"{bucket}/photos/", output))
    assert (result.ok, result.errors_by_reason) == (2, {"invalid_image": 1})
    rows = _rows(output)
    assert {name: rows[name]["status"] for name in rows} == {
        "a.png": "ok",
        "sub/cat 01#[1].png": "ok",
        "bad.png": "error",
    }
    assert fs.exists(f"{bucket}/out/_input/listing-00000.parquet")
    for name, seed in names.items():
        written = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{bucket}/out/{rows[name]['path']}"))))
        assert np.array_equal(written, _pixels(seed)), name
