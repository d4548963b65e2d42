"""Shard planning on the driver: input files → shards of Parquet row groups, from the footers alone.

A shard is a descriptor (file, row-group range), never data: the driver reads only Parquet footers,
so planning costs the same for a thousand rows or a billion. Shard ids and derived row ids come from
the input file's path relative to the input root, so they stay the same from one run to the next and
new files added to the input get new ids while old ones keep theirs.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.errors import ImagemillError
from imagemill.spec import InputSpec
from imagemill.storage import filesystem

_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Shard:
    shard_id: str
    file_url: str
    file_key: str  # the input file's stable name; derived row ids start with it
    row_group_start: int
    row_group_end: int  # exclusive
    first_row: int  # index in the file of the shard's first row
    num_rows: int


@dataclass(frozen=True)
class UnreadableFile:
    """An input file whose footer could not be read: its rows are unknown, so it fails as one unit."""

    shard_id: str
    file_url: str
    error: str


@dataclass(frozen=True)
class ShardPlan:
    shards: list[Shard]
    files: list[str]
    unreadable: list[UnreadableFile]
    footers: dict[str, str] = field(default_factory=dict)  # readable file URL → footer_digest

    @property
    def total_rows(self) -> int:
        return sum(shard.num_rows for shard in self.shards)


def file_key(relative_path: str) -> str:
    """A name for an input file that is safe in object keys and unique for distinct relative paths."""
    stem = relative_path.removesuffix(".parquet")
    safe = _UNSAFE_NAME_CHARS.sub("_", stem)
    if safe == stem and "/" not in relative_path:
        return safe
    return f"{safe}-{hashlib.sha256(relative_path.encode()).hexdigest()[:8]}"


def list_input_files(spec: InputSpec) -> tuple[list[str], str]:
    """The Parquet files named by a file, a folder or a glob, sorted, and the root they are relative to."""
    fs, path = filesystem(spec.path, spec.storage_options)
    if _GLOB_CHARS.search(path):
        files = [f for f in fs.glob(path) if fs.isfile(f)]
        root = _GLOB_CHARS.split(path, maxsplit=1)[0].rpartition("/")[0]
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(".parquet")]
        root = path.rstrip("/")
    elif fs.isfile(path):
        files = [path]
        root = path.rpartition("/")[0]
    else:
        raise ImagemillError(f"input path does not exist: {spec.path}")
    if not files:
        raise ImagemillError(f"no Parquet files found at {spec.path} (a folder is searched for *.parquet)")
    return sorted(files), root


def _read_footer(fs, path: str) -> pq.FileMetaData | str:
    """The file's footer, or why it cannot be read: one bad file must not stop the others."""
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata
    except Exception as exc:
        return f"cannot read Parquet file {fs.unstrip_protocol(path)}: {type(exc).__name__}: {exc}"


def footer_digest(metadata: pq.FileMetaData) -> str:
    """SHA-256 of the file's Parquet footer: the input file's identity, compared between runs
    (imagemill.inputs says why the footer)."""
    sink = pa.BufferOutputStream()
    metadata.write_metadata_file(sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _check_columns(spec: InputSpec, url: str, metadata: pq.FileMetaData) -> None:
    columns = metadata.schema.names
    if spec.prompt_column not in columns:
        raise ImagemillError(
            f"prompt column '{spec.prompt_column}' not found in {url}; columns found: {', '.join(columns)}. "
            "Set input.prompt_column to the column that holds the prompts."
        )


def _shards_of_file(url: str, key: str, metadata: pq.FileMetaData, rows_per_shard: int) -> list[Shard]:
    shards: list[Shard] = []
    start, first_row, rows = 0, 0, 0
    for index in range(metadata.num_row_groups):
        rows += metadata.row_group(index).num_rows
        is_last = index == metadata.num_row_groups - 1
        if rows >= rows_per_shard or (is_last and rows > 0):
            end = index + 1
            shards.append(
                Shard(
                    shard_id=f"{key}-rg{start:05d}-{end:05d}",
                    file_url=url,
                    file_key=key,
                    row_group_start=start,
                    row_group_end=end,
                    first_row=first_row,
                    num_rows=rows,
                )
            )
            start, first_row, rows = end, first_row + rows, 0
    return shards


def plan_shards(spec: InputSpec) -> ShardPlan:
    """List the input, check every file's columns, and cut it into shards of about rows_per_shard rows."""
    fs, _ = filesystem(spec.path, spec.storage_options)
    files, root = list_input_files(spec)
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda path: _read_footer(fs, path), files))
    shards: list[Shard] = []
    urls = []
    unreadable: list[UnreadableFile] = []
    digests: dict[str, str] = {}
    for path, metadata in zip(files, footers, strict=True):
        url = fs.unstrip_protocol(path)
        urls.append(url)
        key = file_key(path[len(root) :].lstrip("/") if root else path)
        if isinstance(metadata, str):
            unreadable.append(UnreadableFile(f"{key}-unreadable", url, metadata))
            continue
        _check_columns(spec, url, metadata)
        digests[url] = footer_digest(metadata)
        shards.extend(_shards_of_file(url, key, metadata, spec.rows_per_shard))
    return ShardPlan(shards=shards, files=urls, unreadable=unreadable, footers=digests)
