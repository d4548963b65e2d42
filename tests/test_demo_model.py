"""Does the shipped demo model draw what its prompts say, for colour x shape x position triples it never
saw? Issue #6 asks for the colour and the shape in at least 9 of 10; the position is held to the same.

The images come from the demo job as a user runs it (jobs/demo.yaml, its model from the repository,
through Ray), with only the prompts swapped for the held-out ones; each is measured with simple image
statistics: the shape region is what differs from the border's colour, its colour is the nearest named
hue, its shape the drawn shape that best overlaps it in its bounding box, its position the anchor
nearest the box's centre.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_metadata, run_cli
from PIL import Image

from imagemill.demo import shapes as demo_shapes
from imagemill.demo.shapes import Scene

REPO = Path(__file__).resolve().parents[1]
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in demo_shapes.COLOURS.items()}


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _shape_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that differ from the border's colour by at least half as much as the shape does."""
    pixels = image.astype(float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=2)
    return distance > 0.5 * max(np.percentile(distance, 99), 1)


def _best_template(mask: np.ndarray, centre: tuple[float, float], half: float) -> str:
    """The shape whose drawing, in the mask's bounding box, overlaps the mask most (intersection/union)."""

    def overlap(shape: str) -> float:
        template = _shape_mask(demo_shapes.render(shape, centre, half, (255, 255, 255), (0, 0, 0)))
        return (template & mask).sum() / (template | mask).sum()

    return max(demo_shapes.SHAPES, key=overlap)


def measure(image: np.ndarray) -> Scene:
    """What a 32x32 uint8 image shows, as a Scene (its background left empty: not measured)."""
    mask = _shape_mask(image)
    # The bounding box of rows and columns with 2+ shape pixels, so a stray pixel does not stretch it.
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if not len(rows) or not len(cols):
        return Scene("", "", "", "")
    centre = ((cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2)
    shape = _best_template(mask, centre, (cols[-1] - cols[0] + rows[-1] - rows[0] + 2) / 4)
    hue = colorsys.rgb_to_hsv(*(image[mask].mean(axis=0) / 255))[0]
    colour = min(HUES, key=lambda name: _hue_distance(HUES[name], hue))
    anchors = {name: anchor for name, (_, anchor) in demo_shapes.POSITIONS.items()}
    position = min(anchors, key=lambda p: np.hypot(centre[0] - anchors[p][0], centre[1] - anchors[p][1]))
    return Scene(colour, shape, position, "")


def test_the_measurement_reads_drawn_scenes_exactly():
    """The yardstick itself: on the training drawings (every scene, jittered) it is never wrong."""
    rng = np.random.default_rng(1)
    for scene in demo_shapes.scenes(held_out=False) + demo_shapes.scenes(held_out=True):
        assert measure(demo_shapes.draw(scene, rng)) == scene._replace(background=""), scene


IMAGES_PER_SCENE = 4  # 180 images: one more or fewer right moves a share by 0.6 points, not 2


@pytest.fixture(scope="module")
def held_out_images(ray_address, tmp_path_factory) -> list[tuple[Scene, np.ndarray]]:
    """The demo job run on every held-out triple on every background, IMAGES_PER_SCENE images of each
    (each with its own seed): (scene asked for, image)."""
    scenes = {demo_shapes.caption(s): s for s in demo_shapes.scenes(held_out=True)}
    root = tmp_path_factory.mktemp("demo-fidelity")
    ids = [f"held-{i:03d}" for i in range(len(scenes))]
    pq.write_table(pa.table({"id": ids, "prompt": list(scenes)}), root / "held.parquet")
    done = run_cli(
        "run", "jobs/demo.yaml", "--input", str(root / "held.parquet"), "--output", str(root / "out"),
        "--set", f"generation.images_per_prompt={IMAGES_PER_SCENE}", "--no-progress",
        ray_address=ray_address, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [
        (scenes[row["prompt"]], np.asarray(Image.open(root / "out" / row["path"]).convert("RGB")))
        for row in read_metadata(str(root / "out")).to_pylist()
    ]


def _score(held_out_images, fields: tuple[str, ...]) -> tuple[float, list[str]]:
    """Share of images whose measured `fields` are all the ones asked for, and the captions of the misses."""
    seen = [(asked, measure(image)) for asked, image in held_out_images]
    misses = [
        demo_shapes.caption(a) for a, got in seen if any(getattr(a, f) != getattr(got, f) for f in fields)
    ]
    return 1 - len(misses) / len(seen), misses


@pytest.mark.parametrize(
    "fields", [("colour",), ("shape",), ("position",), ("colour", "shape")], ids=lambda f: "+".join(f)
)
def test_demo_model_draws_the_colour_shape_and_position_of_unseen_combinations(held_out_images, fields):
    """Each on its own, and colour and shape both right in the same image, in at least 9 of 10."""
    assert len(held_out_images) == 45 * IMAGES_PER_SCENE
    score, misses = _score(held_out_images, fields)
    assert score >= 0.9, (score, misses)
