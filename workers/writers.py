"""Where a shard's images go: one `ShardWriter` per `output.format`, chosen by `open_writer`.

A worker opens one writer per shard attempt. Its writer threads encode each ok row's image and call
`add(position, row, data)`, which stages it in the shard's `ShardAttempt` (published at the commit,
core/write_gate.py) and returns the row's `MetadataRow` with the columns saying where the image lives
filled in (`path`, and `key` for WebDataset). Once every `add` has returned, the worker
calls `close()`, then writes the shard's metadata Parquet, then its commit record: images, metadata,
commit, in every format.

- `files`: `FileWriter` stages each image at once, for `images/<shard_id>/<name>.<ext>`.
- `webdataset`: `TarWriter` builds `webdataset/<shard_id>.tar` with `<key>.<ext>` and `<key>.json` per
  row (`output.sample_key`), in memory, and uploads it on `close()`.
- `parquet`: `ParquetWriter` builds `data/<shard_id>.parquet` (the metadata columns plus an `image`
  column, Hugging Face `Image` feature in the schema), in memory, and uploads it on `close()`.

What a WebDataset JSON member and a `data/` row say is the row's published form
(`imagemill.provenance.publication`: no bucket or local path under `output.embed_parameters: public`);
the metadata Parquet keeps the row as it is.

Both buffered formats write their rows in shard order whatever order the threads finish in, with
fixed tar headers, so a shard's file is the same bytes on every run. A shard with no ok row gets no
tar or data file. The file is named after the shard id, not numbered: a number by position would
change when new input files join the job, and resume relies on names that do not.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa

from imagemill.core.carry import Carried, append_columns
from imagemill.core.layout import OutputLayout, image_name, parquet_bytes, sample_key
from imagemill.core.records import METADATA_SCHEMA, MetadataRow
from imagemill.core.spec import IMAGE_EXTENSIONS, OutputSpec
from imagemill.core.write_gate import ShardAttempt
from imagemill.provenance.publication import Publication

# Generation parameters grouped under "parameters" in a WebDataset sample's JSON.
SAMPLE_PARAMETERS = ("negative_prompt", "num_inference_steps", "guidance_scale", "prompt_truncated", "model")
# Text fields a row may leave empty. Readers that infer a schema from the first samples (`datasets`'
# webdataset loader reads 5 of the first tar) would type a field null there and fail on a later tar's
# string, so the JSON writes "" for none; the metadata Parquet, which has a schema, keeps the null.
SAMPLE_TEXT_FIELDS = ("negative_prompt", "expanded_prompt", "safety_concepts", "rejected_draws")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image storage
_HF_DTYPES = {pa.string(): "string", pa.bool_(): "bool", pa.int64(): "int64", pa.float64(): "float64"}


def _data_schema() -> pa.Schema:
    """Metadata columns of a row with an image (less error and path, the same for every such row) plus
    `image`, with the Hugging Face features in the schema metadata so that `datasets` decodes
    `image` to PIL images without a cast. `status` stays: `filtered` rows kept by
    scoring.on_low_score: keep are there too."""
    fields = [field for field in METADATA_SCHEMA if field.name not in ("error", "path")]
    features: dict[str, Any] = {f.name: {"dtype": _HF_DTYPES[f.type], "_type": "Value"} for f in fields}
    features["image"] = {"_type": "Image"}
    huggingface = json.dumps({"info": {"features": features}}, allow_nan=False)
    return pa.schema([*fields, pa.field("image", IMAGE_TYPE)], metadata={"huggingface": huggingface})


DATA_SCHEMA = _data_schema()


class ShardWriter:
    """Stores one shard's encoded images. `add` may be called from several threads at once."""

    format_columns: tuple[str, ...] = ()  # records.FORMAT_COLUMNS this format adds to the metadata Parquet

    def __init__(
        self,
        attempt: ShardAttempt,
        extension: str,
        publication: Publication,
        carried: Carried | None = None,
    ):
        self.attempt = attempt  # the shard's files are staged there until its commit (core/write_gate.py)
        self.shard_id = attempt.shard_id
        self.extension = extension
        self.publication = publication  # what the buffered formats' records may say (the encoder's)
        self.carried = carried or Carried.none()  # the input columns carried into the buffered formats

    def add(self, position: int, row: MetadataRow, data: bytes) -> MetadataRow:
        """Store the image of the row at `position` in the shard, whose metadata is `row` (sha256
        included); returns `row` with the columns that locate the image."""
        raise NotImplementedError

    def close(self) -> None:
        """Upload whatever is buffered; called once, after the last `add` has returned."""


class FileWriter(ShardWriter):
    """`files`: each image is its own file, uploaded from the calling thread."""

    def add(self, position: int, row: MetadataRow, data: bytes) -> MetadataRow:
        path = OutputLayout.image_path(self.shard_id, row.id, self.extension)
        self.attempt.write(path, data)
        return replace(row, path=path)


class BufferedWriter(ShardWriter):
    """One file per shard at `self.path`, built from every row and uploaded once by `close()`.

    Memory: the shard's encoded images are held until `close()`, and the file is built from them
    before it is uploaded, so a worker holds about twice a shard's encoded images at that moment
    (rows_per_shard is 1024 by default: a few hundred MB of 512×512 PNGs). Lower
    `input.rows_per_shard` to hold less.
    """

    path_of: Callable[[str], str]  # the shard's file, from its id

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.path = self.path_of(self.shard_id)
        self._rows: dict[int, tuple[MetadataRow, bytes]] = {}
        self._lock = threading.Lock()

    def add(self, position: int, row: MetadataRow, data: bytes) -> MetadataRow:
        with self._lock:
            self._rows[position] = (row, data)
        return self.locate(position, row)

    def locate(self, position: int, row: MetadataRow) -> MetadataRow:
        return replace(row, path=self.path)

    def close(self) -> None:
        if self._rows:
            rows = [(position, *self._rows[position]) for position in sorted(self._rows)]
            self.attempt.write(self.path, self.build(rows))
            self._rows.clear()

    def build(self, rows: list[tuple[int, MetadataRow, bytes]]) -> bytes:
        """The file's bytes from (position, metadata row, image bytes), in shard order."""
        raise NotImplementedError


class TarWriter(BufferedWriter):
    """`webdataset`: `webdataset/<shard_id>.tar` with `<key>.<ext>` and `<key>.json` per ok row.

    Keys come from the shard id and the row's position in the shard (`output.sample_key`), not from
    the row id: unique across shards, stable across runs, safe as file names, and free of dots.
    """

    format_columns = ("key",)

    path_of = staticmethod(OutputLayout.tar_path)

    def locate(self, position: int, row: MetadataRow) -> MetadataRow:
        return replace(row, path=self.path, key=sample_key(self.shard_id, position))

    def sample_json(self, position: int, row: MetadataRow) -> bytes:
        """The sample's JSON: the published row's fields, its parameters, where it came from in the
        input (`input_file`, `input_row`), its key, and the carried input columns."""
        names = (
            "id",
            "input_file",
            "input_row",
            "prompt",
            "expanded_prompt",
            "seed",
            "width",
            "height",
            "sha256",
            "status",
            "clip_score",
        )
        row = self.publication.record(row)
        row = replace(row, **{name: getattr(row, name) or "" for name in SAMPLE_TEXT_FIELDS})
        sample: dict[str, Any] = {name: getattr(row, name) for name in names}
        sample["parameters"] = {name: getattr(row, name) for name in SAMPLE_PARAMETERS}
        sample["key"] = sample_key(self.shard_id, position)
        sample |= self.carried.json_values(position)
        return json.dumps(sample, sort_keys=True, allow_nan=False).encode()

    def build(self, rows: list[tuple[int, MetadataRow, bytes]]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for position, row, data in rows:
                key = sample_key(self.shard_id, position)
                for name, content in (
                    (f"{key}.{self.extension}", data),
                    (f"{key}.json", self.sample_json(position, row)),
                ):
                    member = tarfile.TarInfo(name)  # fixed mtime, owner and mode: the same bytes every run
                    member.size, member.mtime, member.mode = len(content), 0, 0o644
                    member.uid = member.gid = 0
                    member.uname = member.gname = ""
                    tar.addfile(member, io.BytesIO(content))
        return buffer.getvalue()


class ParquetWriter(BufferedWriter):
    """`parquet`: `data/<shard_id>.parquet`, one row per ok row, the image in `image` (bytes and a
    name), readable as is by `datasets.load_dataset("parquet", ...)` and `ray.data.read_parquet`."""

    path_of = staticmethod(OutputLayout.data_path)

    def build(self, rows: list[tuple[int, MetadataRow, bytes]]) -> bytes:
        records = [
            {
                **self.publication.record(row).columns(),
                "image": {"bytes": data, "path": f"{image_name(row.id)}.{self.extension}"},
            }
            for _, row, data in rows
        ]
        table = pa.Table.from_pylist(records, schema=DATA_SCHEMA)
        return parquet_bytes(append_columns(table, self.carried.take(position for position, _, _ in rows)))


WRITERS: dict[str, type[ShardWriter]] = {
    "files": FileWriter,
    "webdataset": TarWriter,
    "parquet": ParquetWriter,
}


def open_writer(
    spec: OutputSpec, attempt: ShardAttempt, publication: Publication, carried: Carried | None = None
) -> ShardWriter:
    """The writer for `spec.format`, for one shard attempt; `publication`: the actor's (its encoder's);
    `carried`: the shard's carried input columns."""
    return WRITERS[spec.format](attempt, IMAGE_EXTENSIONS[spec.image_format], publication, carried)
