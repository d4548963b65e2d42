"""The image-to-image example's source images: a few shapes drawn by the demo world's renderer.

`jobs/augment_img2img.yaml` re-draws each of them in another colour with the demo model. Written by
`python -m imagemill.demo.sources jobs/img2img` (the same bytes on every run of the same Pillow):
`images/<id>.png` (32x32, a few hundred bytes each) and `sources.parquet` (id, prompt, and the image's
path relative to the Parquet file, as `input.image_column` reads it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imagemill.demo.shapes import Scene, caption, draw

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


if __name__ == "__main__":
    print(write_sources(sys.argv[1] if len(sys.argv) > 1 else "jobs/img2img"))
