"""Super-resolution (`upscale:`) through spandrel: tiny random-weight Compact networks that spandrel must
recognise from their keys (imagemill.testing.tiny_upscaler), loaded through the job's real path.

Tiles equal the whole image's result; a job writes x2 and x4 images with the upscaler in its metadata
and its seconds in the breakdown, and resumes byte-identical; after the safety stage the network sees a
flagged image only blurred, and a dropped one not at all (issue #25 acceptance 5).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import prompt_table, read_metadata
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.in_process import load_worker, run_in_process, run_shards
from imagemill.testing.in_process import output_hashes as _files
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.safety import blur
from imagemill.workers.stages.upscale import INSTALL, SpandrelUpscaler, spandrel_loader

try:
    spandrel_loader("cpu")
except ImagemillError:
    pytest.skip(f"spandrel is not installed: {INSTALL}", allow_module_level=True)

SIZE = 32
ROWS = 8
CONVS = 2  # the tiny network's receptive field: CONVS + 2 input pixels


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory) -> dict[int, str]:
    from imagemill.testing.tiny_upscaler import make_tiny_upscaler

    folder = tmp_path_factory.mktemp("upscalers")
    return {scale: str(make_tiny_upscaler(folder / f"x{scale}", scale, convs=CONVS)) for scale in (2, 4)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread, as run_in_process draws: the same bytes, and no threads fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    pq.write_table(prompt_table(ROWS), folder / "a.parquet", row_group_size=4)  # two shards of 4 rows
    return folder


def _spec(prompts_dir: Path, output: Path, tiny_model: str, **sections) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {
            "name": output.name,
            "input": {"path": str(prompts_dir), "rows_per_shard": 4},
            "output": {"path": str(output)},
            "model": {"source": tiny_model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2, "seed": 3},
            "workers": {"num_workers": 1, "batch_size": 3},
            **sections,
        }
    )


def _images(output: Path) -> dict[str, np.ndarray]:
    """Each written row's image by id."""
    rows = read_metadata(str(output)).to_pylist()
    return {
        row["id"]: np.asarray(Image.open(output / row["path"]).convert("RGB")) for row in rows if row["path"]
    }


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    tile=st.integers(16, 48),
    extra=st.integers(0, 6),
    count=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_tiles_equal_the_whole_image(upscalers, height, width, tile, extra, count, seed):
    """Tiled with an overlap of at least the receptive field = untiled, within one level, at any image
    and tile size (edge tiles, tiles larger than the image, a batch)."""
    images = torch.randint(
        0, 256, (count, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    source = Pretrained(upscalers[2], "upscale.source")
    whole = SpandrelUpscaler(source, "float32", None, 0, "cpu")(images, [], [])
    tiled = SpandrelUpscaler(source, "float32", tile, CONVS + 2 + extra, "cpu")(images, [], [])
    assert tiled.shape == (count, 2 * height, 2 * width, 3)
    assert int((tiled.int() - whole.int()).abs().max()) <= 1


def test_a_too_small_overlap_shows_seams(upscalers):
    """The tolerance above means something: without overlap, tile edges differ from the whole."""
    images = torch.randint(
        0, 256, (1, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    source = Pretrained(upscalers[2], "upscale.source")
    whole = SpandrelUpscaler(source, "float32", None, 0, "cpu")(images, [], [])
    seams = SpandrelUpscaler(source, "float32", 16, 0, "cpu")(images, [], [])
    assert int((seams.int() - whole.int()).abs().max()) > 1


@pytest.mark.parametrize("scale", [2, 4])
def test_a_job_writes_upscaled_images_records_the_upscaler_and_resumes_byte_identical(
    tmp_path, prompts_dir, tiny_model, upscalers, scale
):
    upscale = {"source": upscalers[scale], "tile": 16, "tile_overlap": CONVS + 2}  # 32x32: four tiles
    spec = _spec(prompts_dir, tmp_path / "out", tiny_model, upscale=upscale)
    result = run_in_process(spec)
    assert result.ok == ROWS and result.errors == 0
    output = Path(spec.output.path)
    images = _images(output)
    assert len(images) == ROWS and all(
        image.shape == (SIZE * scale, SIZE * scale, 3) for image in images.values()
    )
    digest = SpandrelUpscaler(
        Pretrained(upscalers[scale], "upscale.source"), "float32", None, 0, "cpu"
    ).sha256
    for row in read_metadata(str(output)).to_pylist():
        assert (row["upscaler"], row["upscaler_sha256"]) == (upscalers[scale], digest)
        assert (row["upscale_scale"], row["upscale_tile"]) == (scale, 16)
        assert (row["width"], row["height"]) == (SIZE, SIZE)  # the generation's parameters
    for stats in (output / "shards").glob("*.json"):
        assert json.loads(stats.read_text())["stage_seconds"]["upscale"] > 0
    assert "super-resolution (device)" in (output / "report.html").read_text()
    before = _files(output)
    sorted((output / "shards").glob("*.json"))[0].unlink()  # as if killed before this shard committed
    resumed = run_in_process(spec)
    assert resumed.shards_run == 1 and _files(output) == before


def test_a_network_that_is_not_super_resolution_is_one_line(tmp_path, upscalers):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ImagemillError, match=r"^upscale.source .*no network spandrel knows") as error:
        SpandrelUpscaler(Pretrained(str(tmp_path), "upscale.source"), "float32", None, 0, "cpu")
    assert "\n" not in str(error.value)
    with pytest.raises(ImagemillError, match="has no model.safetensors"):
        SpandrelUpscaler(Pretrained(str(tmp_path / "missing"), "upscale.source"), "float32", None, 0, "cpu")


def test_the_spec_refuses_an_overlap_as_large_as_the_tile(prompts_dir, tiny_model, upscalers, tmp_path):
    with pytest.raises(ImagemillError, match="tile_overlap 16 must be less than tile 16"):
        _spec(prompts_dir, tmp_path / "o", tiny_model, upscale={"source": upscalers[2], "tile": 16})


# --- issue #25 acceptance 5: the network sees a flagged image blurred, a dropped one never ---


@pytest.fixture(scope="module")
def flagging(
    tmp_path_factory, prompts_dir, tiny_model, tiny_clip
) -> tuple[str, dict[str, np.ndarray], set[str]]:
    """A checker that flags the upper half of the rows, each row's image as drawn, and the flagged ids
    (a keep run with threshold 0 records each row's cosine as its safety score)."""
    from imagemill.testing.tiny_safety import make_tiny_safety_checker

    folder = tmp_path_factory.mktemp("flagging")
    probe = make_tiny_safety_checker(folder / "probe", tiny_clip, 0.0)
    spec = _spec(prompts_dir, folder / "drawn", tiny_model, safety={"source": str(probe), "policy": "keep"})
    run_in_process(spec)
    cosine = {row["id"]: row["safety_score"] for row in read_metadata(spec.output.path).to_pylist()}
    ordered = sorted(cosine.values())
    threshold = statistics.mean(ordered[ROWS // 2 - 1 : ROWS // 2 + 1])
    checker = make_tiny_safety_checker(folder / "checker", tiny_clip, threshold)
    flagged = {row_id for row_id, value in cosine.items() if value > threshold}
    assert 0 < len(flagged) < ROWS
    return str(checker), _images(Path(spec.output.path)), flagged


class _Recording:
    """The stage's upscaler, recording every image the model is given."""

    def __init__(self, upscaler, seen: list[np.ndarray]):
        self.upscaler, self.seen, self.scale = upscaler, seen, upscaler.scale

    def __call__(self, images: torch.Tensor, texts: list[str], seeds: list[int]) -> torch.Tensor:
        self.seen.extend(images.numpy())
        return self.upscaler(images, texts, seeds)


@pytest.mark.parametrize(
    ("policy", "kind"),
    [("blur", "spandrel"), ("drop", "spandrel"), ("blur", "diffusers"), ("drop", "diffusers")],
)
def test_the_upscaler_sees_a_flagged_image_only_blurred_and_a_dropped_one_never(
    tmp_path, prompts_dir, tiny_model, upscalers, diffusers_upscalers, flagging, one_thread, policy, kind
):
    checker, drawn, flagged = flagging
    upscale = (
        {"source": upscalers[2], "tile": None}
        if kind == "spandrel"
        else _diffusers_section(diffusers_upscalers["latent"])
    )
    spec = _spec(
        prompts_dir,
        tmp_path / "out",
        tiny_model,
        safety={"source": checker, "policy": policy},
        upscale=upscale,
    )
    worker = load_worker(spec)
    seen: list[np.ndarray] = []
    stage = worker.stages.get("upscale")
    stage.upscaler = _Recording(stage.upscaler, seen)
    run_shards(worker)  # on one thread (one_thread), as run_in_process drew the probe's images

    def hidden(row_id: str) -> np.ndarray:
        return blur(torch.from_numpy(drawn[row_id].copy()[None])).numpy()[0]

    expected = {row_id: drawn[row_id] for row_id in drawn if row_id not in flagged}
    if policy == "blur":
        expected |= {row_id: hidden(row_id) for row_id in flagged}
    assert len(seen) == len(expected)
    for row_id, image in expected.items():
        assert any(np.array_equal(image, input_image) for input_image in seen), row_id
    written = _images(Path(spec.output.path))
    assert set(written) == set(expected)
    assert all(image.shape == (2 * SIZE, 2 * SIZE, 3) for image in written.values())


def test_the_guides_example_sections_load(tmp_path, prompts_dir, tiny_model):
    import yaml
    from doc_pages import blocks, page_text

    spandrel, diffusers, reference, enhance = blocks(page_text("docs/upscale.md"), "yaml")
    spec = _spec(prompts_dir, tmp_path / "o", tiny_model, **yaml.safe_load(spandrel))
    assert (spec.upscale.kind, spec.upscale.tile, spec.upscale.tile_overlap) == ("spandrel", 512, 16)
    spec = _spec(prompts_dir, tmp_path / "o", tiny_model, **yaml.safe_load(diffusers))
    assert (spec.upscale.kind, spec.upscale.noise_level, spec.upscale.tile) == ("diffusers", 20, 512)
    example = yaml.safe_load(reference)
    spec = _spec(
        prompts_dir,
        tmp_path / "o",
        tiny_model,
        input={"path": str(prompts_dir), **example["input"]},
        upscale=example["upscale"],
    )
    assert (spec.input.image_column, spec.input.reference_column) == ("image", "reference")
    spec = imagemill.build_spec(yaml.safe_load(enhance) | {"output": {"path": str(tmp_path / "o")}})
    assert (spec.input.format, spec.model.kind, spec.generation.resize) == ("images", "none", "keep")


@pytest.mark.parametrize("name", ["upscaler", "Upscale_Scale"])
def test_a_carried_column_cannot_take_an_upscale_column_name(tmp_path, tiny_model, upscalers, name):
    """The metadata would hold two columns of one name, which no Parquet reader loads: refused on the
    driver in one line, before any image is drawn."""
    table = prompt_table(2).append_column(name, pa.array(["mine", "mine"]))
    pq.write_table(table, tmp_path / "p.parquet")
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "p.parquet"), "carry_columns": [name]},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2},
            "upscale": {"source": upscalers[2]},
        }
    )
    with pytest.raises(ImagemillError, match=f"'{name}' of .* clashes with the output column") as error:
        run_in_process(spec)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "images").exists()


# --- issue #25 item 1: diffusers' upscalers (x4 prompt-guided, latent x2) as kind: diffusers ---

DIFFUSERS_STEPS = 2
PIPELINE_SCALES = {"x4": 4, "latent": 2}


@pytest.fixture(scope="module")
def diffusers_upscalers(tmp_path_factory) -> dict[str, str]:
    from imagemill.testing.tiny_upscaler import make_tiny_diffusers_upscaler

    folder = tmp_path_factory.mktemp("diffusers-upscalers")
    return {name: str(make_tiny_diffusers_upscaler(folder / name, name)) for name in PIPELINE_SCALES}


def _diffusers_section(source: str, **settings) -> dict:
    return {"kind": "diffusers", "source": source, "num_inference_steps": DIFFUSERS_STEPS} | settings


@pytest.mark.model
@pytest.mark.parametrize("pipeline", list(PIPELINE_SCALES))
def test_a_diffusers_upscaler_writes_its_scale_records_itself_and_resumes_byte_identical(
    tmp_path, prompts_dir, tiny_model, diffusers_upscalers, pipeline
):
    from imagemill.provenance.model_hash import directory_hash

    scale, source = PIPELINE_SCALES[pipeline], diffusers_upscalers[pipeline]
    spec = _spec(prompts_dir, tmp_path / "out", tiny_model, upscale=_diffusers_section(source))
    result = run_in_process(spec)
    assert result.ok == ROWS and result.errors == 0
    output = Path(spec.output.path)
    images = _images(output)
    assert all(image.shape == (SIZE * scale, SIZE * scale, 3) for image in images.values())
    assert len({image.tobytes() for image in images.values()}) == ROWS
    for row in read_metadata(str(output)).to_pylist():
        assert (row["upscaler"], row["upscaler_sha256"]) == (source, directory_hash(source))
        assert (row["upscale_scale"], row["upscale_tile"]) == (scale, 512)
    before = _files(output)
    sorted((output / "shards").glob("*.json"))[0].unlink()  # as if killed before this shard committed
    resumed = run_in_process(spec)
    assert resumed.shards_run == 1 and _files(output) == before


@pytest.mark.model
def test_the_x4_upscaler_follows_each_rows_prompt_and_seed_and_refuses_images_over_its_tile(
    diffusers_upscalers, one_thread
):
    """Each row's prompt guides its image and its seed alone draws its noise: one image under two
    prompts gives two images, and a row's image is the same alone as in a batch (within a level)."""
    from imagemill.core.spec.sections import UpscaleSpec
    from imagemill.workers.stages.diffusers_upscaler import DiffusersUpscaler

    section = UpscaleSpec(**_diffusers_section(diffusers_upscalers["x4"], tile=16))
    upscaler = DiffusersUpscaler(Pretrained(section.source, "upscale.source"), section, "cpu")
    image = torch.randint(
        0, 256, (1, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    both = upscaler(image.expand(2, -1, -1, -1), ["a red circle", "a blue star"], [7, 7])
    assert both.shape == (2, 64, 64, 3) and not torch.equal(both[0], both[1])
    alone = upscaler(image, ["a blue star"], [7])
    assert int((alone[0].int() - both[1].int()).abs().max()) <= 1
    other_seed = upscaler(image, ["a blue star"], [8])
    assert not torch.equal(other_seed[0], alone[0])
    with pytest.raises(ValueError, match=r"^upscale.tile: a 20x17 image is over 16 px a side") as error:
        upscaler(torch.zeros((1, 17, 20, 3), dtype=torch.uint8), [""], [0])
    assert "\n" not in str(error.value)


@pytest.mark.model
def test_kept_sizes_over_a_diffusers_upscalers_tile_are_model_rejected_rows(diffusers_upscalers, tmp_path):
    """Enhance-only at each photo's own size (`generation.resize: keep`): a photo over the pipeline's
    `tile` is a model_rejected row naming it, and the smaller one (its own size batch) is upscaled."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, (width, height) in {"small.png": (16, 8), "big.png": (20, 17)}.items():
        Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(folder / name)
    spec = imagemill.build_spec(
        {
            "input": {"path": str(folder), "format": "images"},
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": "none"},
            "generation": {"resize": "keep"},
            "upscale": _diffusers_section(diffusers_upscalers["x4"], tile=16),
        }
    )
    result = run_in_process(spec)
    assert (result.ok, result.errors_by_reason) == (1, {"model_rejected": 1})
    rows = {row["source_image"]: row for row in read_metadata(spec.output.path).to_pylist()}
    assert Image.open(tmp_path / "out" / rows["small.png"]["path"]).size == (64, 32)
    assert rows["big.png"]["error"].startswith("model_rejected: upscale.tile: a 20x17 image is over 16 px")


def test_settings_a_kind_would_ignore_are_refused(prompts_dir, tiny_model, upscalers, tmp_path):
    with pytest.raises(ImagemillError, match="noise_level do not apply to kind: spandrel"):
        _spec(prompts_dir, tmp_path / "o", tiny_model, upscale={"source": upscalers[2], "noise_level": 5})
    with pytest.raises(ImagemillError, match="tile_overlap do not apply to kind: diffusers"):
        _spec(prompts_dir, tmp_path / "o", tiny_model, upscale=_diffusers_section("x", tile_overlap=4))


@pytest.mark.model
def test_a_spandrel_network_or_a_text_to_image_pipeline_as_kind_diffusers_is_one_line(tiny_model, upscalers):
    from imagemill.core.spec.sections import UpscaleSpec
    from imagemill.workers.stages.diffusers_upscaler import DiffusersUpscaler

    section = UpscaleSpec(kind="diffusers", source=tiny_model)
    with pytest.raises(ImagemillError, match="a StableDiffusionPipeline, not an upscaler") as error:
        DiffusersUpscaler(Pretrained(tiny_model, "upscale.source"), section, "cpu")
    assert "\n" not in str(error.value)


# --- issue #25 item 2: a row's own scale (input.scale_column) ---


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    factor=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 99),
)
def test_the_box_filter_undoes_a_nearest_enlargement_and_keeps_the_mean(height, width, factor, seed):
    from imagemill.workers.stages.upscale import reduced

    small = torch.randint(
        0, 256, (2, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    large = small.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    assert torch.equal(reduced(large, factor), small)
    noisy = torch.randint(
        0, 256, large.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed + 1)
    )
    out = reduced(noisy, factor)
    assert out.shape == small.shape
    assert abs(out.float().mean() - noisy.float().mean()) <= 0.5


def test_a_rows_scale_must_divide_the_upscalers():
    from imagemill.workers.stages.upscale import scale_problem

    assert scale_problem(2, 4) is None and scale_problem(4, 4) is None
    assert scale_problem(4, 2) == "upscale: scale 4 is not one the upscaler (x2) gives: use 2"
    assert scale_problem(3, 4) == "upscale: scale 3 is not one the upscaler (x4) gives: use 2 or 4"


def test_a_scale_column_needs_an_upscale_section(prompts_dir, tiny_model, tmp_path):
    spec = _spec(prompts_dir, tmp_path / "o", tiny_model).model_dump()
    spec["input"]["scale_column"] = "scale"
    with pytest.raises(ImagemillError, match="input.scale_column .* needs an upscale: section"):
        imagemill.build_spec(spec)


def test_per_row_scales_from_one_x4_network(tmp_path, tiny_model, upscalers):
    """x4 and x2 images from one x4 network: x2 is the x4 result box-filtered (within a level: the rows
    are in other batches); a scale the network cannot give, or no integer, is the row's error."""
    from imagemill.workers.stages.upscale import reduced

    scales = [4, 2, None, 3, 8, 2.5, 1, 2.0]  # a float column: pandas writes integers with nulls so
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(scales))],
            "prompt": ["a red circle"] * len(scales),
            "seed": [5] * len(scales),
            "scale": pa.array(scales, pa.float64()),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path / "p.parquet"), "scale_column": "scale"},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": SIZE, "height": SIZE, "num_inference_steps": 2},
            "workers": {"batch_size": 3},
            "upscale": {"source": upscalers[4], "tile": None},
        }
    )
    run_in_process(spec)
    rows = {row["id"]: row for row in read_metadata(spec.output.path).to_pylist()}
    images = _images(Path(spec.output.path))
    assert images["r0"].shape == (4 * SIZE, 4 * SIZE, 3) and images["r2"].shape == images["r0"].shape
    assert images["r1"].shape == (2 * SIZE, 2 * SIZE, 3) and images["r7"].shape == images["r1"].shape
    assert (rows["r0"]["upscale_scale"], rows["r1"]["upscale_scale"], rows["r2"]["upscale_scale"]) == (
        4,
        2,
        4,
    )
    expected = reduced(torch.from_numpy(images["r0"][None].copy()), 2)[0].numpy()
    assert int(np.abs(expected.astype(int) - images["r1"].astype(int)).max()) <= 1
    assert (
        rows["r3"]["error"]
        == "model_rejected: upscale: scale 3 is not one the upscaler (x4) gives: use 2 or 4"
    )
    assert rows["r4"]["error"].startswith("model_rejected: upscale: scale 8")
    assert rows["r5"]["error"] == "invalid_parameter: scale must be an integer in [2, 8], got 2.5"
    assert rows["r6"]["error"] == "invalid_parameter: scale must be an integer in [2, 8], got 1"
