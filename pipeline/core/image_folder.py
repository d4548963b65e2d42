"""`input.format: images`: a folder, glob or bucket prefix of images as the input, no Parquet.

What the driver (imagemill.planning.image_listing, which lists the folder and freezes the listing in the
output) and the actors (workers/source_images.py, which read each listed image) must agree on: which
names are images, the folder the listing's paths are relative to, and the listing's columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagemill.core.storage import glob_root, is_glob

if TYPE_CHECKING:
    from imagemill.core.spec import InputSpec

# The files a folder's listing takes, by name (any case); README.txt, _SUCCESS and the like are skipped.
# What a file holds is judged when it is read (imagemill.core.images.decode_image), not by its name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The listing's column of image paths (relative to image_root); its ids are in input.id_column.
LISTING_IMAGE_COLUMN = "image"


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def image_root(spec: InputSpec) -> str:
    """The folder (URL) an image input's paths are relative to: the folder itself, or a glob's
    folder before its first glob character."""
    return glob_root(spec.path) if is_glob(spec.path) else spec.path.rstrip("/")


def source_folder(spec: InputSpec, input_file: str) -> str:
    """The folder a shard's relative source paths are read from: the image folder for `images`
    (the shard's file is its listing, in the output), else the input file's own folder."""
    return image_root(spec) if spec.format == "images" else input_file.rsplit("/", 1)[0]
