"""The image-to-image and inpainting examples' sources: shapes drawn by the demo world's renderer.

`jobs/augment_img2img.yaml` re-draws each of them in another colour with the demo model. Written by
`python -m imagemill.demo.sources jobs/img2img` (the same bytes on every run of the same Pillow):
`images/<id>.png` (32x32, a few hundred bytes each) and `sources.parquet` (id, prompt, and the image's
path relative to the Parquet file, as `input.image_column` reads it).

`jobs/inpaint.yaml` masks the shape of each of its sources and asks for another shape, in another
colour, in its place: `python -m imagemill.demo.sources jobs/inpaint --inpaint` writes `images/`,
`masks/<id>.png` (white over the shape's box and a pixel around it) and `sources.parquet` (id, prompt,
image, mask, and the `shape` and `colour` asked for, which the demo classifier's reading is held to).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imagemill.demo.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, caption, draw

# (source scene, the colour its prompt asks for)
SOURCES: list[tuple[Scene, str]] = [
    (Scene("red", "circle", "left", "white"), "blue"),
    (Scene("yellow", "square", "right", "black"), "purple"),
    (Scene("green", "triangle", "top", "grey"), "red"),
    (Scene("blue", "circle", "bottom", "white"), "yellow"),
    (Scene("purple", "square", "center", "grey"), "green"),
    (Scene("red", "triangle", "right", "black"), "blue"),
]


def write_sources(folder: str | Path) -> Path:
    """Draw the sources into `folder`/images and write `folder`/sources.parquet; returns the Parquet path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids, prompts, paths = [], [], []
    for scene, colour in SOURCES:
        name = f"{scene.colour}-{scene.shape}-{scene.position}"
        Image.fromarray(draw(scene, rng)).save(folder / "images" / f"{name}.png", optimize=True)
        ids.append(name)
        prompts.append(caption(scene._replace(colour=colour)))
        paths.append(f"images/{name}.png")
    table = pa.table({"id": ids, "prompt": prompts, "image": paths})
    pq.write_table(table, folder / "sources.parquet")
    return folder / "sources.parquet"


def inpainting_scenes() -> list[tuple[Scene, Scene]]:
    """(source scene, scene asked for) pairs: every position on every background, each asking for each
    shape in place of another one, the colours turning so that each pair changes colour too."""
    colours = list(COLOURS)
    pairs = []
    for i, (position, background, shape) in enumerate(itertools.product(POSITIONS, BACKGROUNDS, SHAPES)):
        source_shape = SHAPES[(SHAPES.index(shape) + 1 + i % 2) % len(SHAPES)]
        source = Scene(colours[i % len(colours)], source_shape, position, background)
        pairs.append((source, Scene(colours[(i + 2) % len(colours)], shape, position, background)))
    return pairs


def shape_box_mask(image: np.ndarray, background: tuple[int, int, int], margin: int = 1) -> np.ndarray:
    """A (H, W) uint8 mask, 255 over the box of every pixel that is not the background, `margin` pixels
    wider on each side, 0 elsewhere."""
    rows, cols = np.nonzero(np.any(image != background, axis=2))
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[
        max(rows.min() - margin, 0) : rows.max() + margin + 1,
        max(cols.min() - margin, 0) : cols.max() + margin + 1,
    ] = 255
    return mask


def write_inpainting_sources(folder: str | Path) -> Path:
    """Draw the inpainting sources and their masks into `folder` and write `folder`/sources.parquet."""
    folder = Path(folder)
    for name in ("images", "masks"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    columns: dict[str, list[str]] = {
        name: [] for name in ("id", "prompt", "image", "mask", "shape", "colour")
    }
    for number, (source, asked) in enumerate(inpainting_scenes()):
        name = f"{number:02d}-{source.colour}-{source.shape}-{source.position}"
        pixels = draw(source, rng)
        Image.fromarray(pixels).save(folder / "images" / f"{name}.png", optimize=True)
        mask = shape_box_mask(pixels, BACKGROUNDS[source.background])
        Image.fromarray(mask, mode="L").save(folder / "masks" / f"{name}.png", optimize=True)
        row = {"id": name, "prompt": caption(asked), "image": f"images/{name}.png",
               "mask": f"masks/{name}.png", "shape": asked.shape, "colour": asked.colour}  # fmt: skip
        for key, value in row.items():
            columns[key].append(value)
    pq.write_table(pa.table(columns), folder / "sources.parquet")
    return folder / "sources.parquet"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the image-to-image (or inpainting) example's sources.")
    parser.add_argument("folder", nargs="?", default="jobs/img2img")
    parser.add_argument("--inpaint", action="store_true", help="the inpainting example's sources and masks")
    args = parser.parse_args(argv)
    print((write_inpainting_sources if args.inpaint else write_sources)(args.folder))


if __name__ == "__main__":
    main()
