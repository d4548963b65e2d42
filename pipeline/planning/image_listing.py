"""`input.format: images`: a folder, glob or bucket prefix of images becomes ordinary Parquet input.

Why a listing frozen in the output: shards are (file, row range) descriptors whose ids must stay the
same from one run to the next, and a folder has no rows. So each run lists the images and writes those
no earlier run listed into a new `OUTPUT/_input/listing-<n>.parquet` (columns: `input.id_column`, the
image's path relative to the folder, and `image`, the same path, which the actors read through
workers/source_images.py from imagemill.core.image_folder's `image_root`). A listing is written once,
create-only through the write gate, while the run holds the output's lease, and never changes: its
shards keep their ids, new images make new shards with new ids, and an image that has gone since it was
listed is read as missing, an `invalid_image` row, if its shard was not done yet.

A row's id is the image's relative path (`photos/cat 01.jpg`); its output file name comes from it by
imagemill.core.layout's `image_name`, which keeps it recognisable and distinct from every other id's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.core.errors import ImagemillError
from imagemill.core.image_folder import IMAGE_SUFFIXES, LISTING_IMAGE_COLUMN, is_image_name
from imagemill.core.layout import OutputLayout, parquet_bytes
from imagemill.core.shard import ShardPlan
from imagemill.core.spec import InputSpec
from imagemill.core.storage import files_under, filesystem
from imagemill.core.write_gate import OwnedOutput, ShardConflict
from imagemill.planning.shards import InputFile, file_key


@dataclass(frozen=True)
class ImageListing:
    files: list[InputFile]  # every listing, earlier runs' and this run's new one, in order
    new: tuple[str, bytes] | None  # this run's listing (path in the output, bytes); None: nothing new


def list_images(spec: InputSpec) -> list[str]:
    """The image files under the input's folder, glob or prefix, as sorted paths relative to it."""
    fs, path = filesystem(spec.path, spec.storage_options)
    if (under := files_under(fs, path)) is not None:
        found, root = under
    elif fs.isfile(path):
        raise ImagemillError(
            f"input.path {spec.path} is a file; with input.format: images it names a folder, a glob or a "
            "bucket prefix of images"
        )
    else:
        raise ImagemillError(f"input path does not exist: {spec.path}")
    return sorted(name[len(root) :].lstrip("/") for name in found if is_image_name(name))


def _listed(layout: OutputLayout, relative: str) -> tuple[pq.FileMetaData, list[str]]:
    """An earlier listing's footer and image paths; one line naming it when it does not read."""
    data = layout.read_bytes(relative, warn=False)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data or b""))
        return parquet.metadata, parquet.read(columns=[LISTING_IMAGE_COLUMN]).column(0).to_pylist()
    except (pa.ArrowException, KeyError) as exc:
        raise ImagemillError(
            f"{layout.path(relative)} is not an image listing imagemill wrote ({type(exc).__name__}); run "
            "with --overwrite to list the input again from the start"
        ) from None


def plan_listing(spec: InputSpec, layout: OutputLayout, overwrite: bool) -> ImageListing:
    """The output's listings (none with `overwrite`, which deletes them) and a new one of the images
    they do not hold. Read-only: the run writes the new one once it holds the output (write_listing)."""
    images = list_images(spec)
    numbers = [] if overwrite else layout.listing_numbers()
    files: list[InputFile] = []
    known: set[str] = set()
    for number in numbers:
        relative = OutputLayout.listing_path(number)
        metadata, paths = _listed(layout, relative)
        known.update(paths)
        files.append(_input_file(layout, relative, metadata))
    new = [image for image in images if image not in known]
    if not new and not files:
        raise ImagemillError(
            f"no images found at {spec.path} (input.format: images takes files named "
            f"{', '.join('*' + extension for extension in IMAGE_SUFFIXES)}, in any case)"
        )
    if not new:
        return ImageListing(files, None)
    relative = OutputLayout.listing_path(numbers[-1] + 1 if numbers else 0)
    data = parquet_bytes(pa.table({spec.id_column: new, LISTING_IMAGE_COLUMN: new}))
    files.append(_input_file(layout, relative, pq.ParquetFile(pa.BufferReader(data)).metadata))
    return ImageListing(files, (relative, data))


def _input_file(layout: OutputLayout, relative: str, metadata: pq.FileMetaData) -> InputFile:
    return layout.fs.unstrip_protocol(layout.path(relative)), file_key(relative.rpartition("/")[2]), metadata


def write_listing(owned: OwnedOutput, plan: ShardPlan) -> None:
    """The plan's new listing into the output, create-only (the caller holds the output's lease)."""
    if plan.new_listing is None:
        return
    relative, data = plan.new_listing
    try:
        owned.create(relative, data)
    except ShardConflict:
        raise ImagemillError(
            f"{owned.layout.path(relative)} was written by another run of this job while this one listed "
            "the input; run again"
        ) from None
