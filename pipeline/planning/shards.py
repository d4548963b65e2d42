"""Shard planning on the driver: input files → shards of about rows_per_shard rows, from the footers alone.

A shard is a descriptor, never data: either whole row groups (file, row-group range) or, for a row
group larger than `rows_per_shard`, a row range of that one row group (a piece; its rows are read
once per run for all its pieces, workers/row_group_pieces.py). The driver reads only Parquet
footers, so planning costs the same for a thousand rows or a billion. Shard ids and derived row ids
come from the input file's path relative to the input root, so they stay the same from one run to
the next and new files added to the input get new ids while old ones keep theirs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.core.carry import check_carried
from imagemill.core.errors import ImagemillError
from imagemill.core.shard import Shard, ShardPlan, UnreadableFile
from imagemill.core.spec import InputSpec
from imagemill.core.storage import files_under, filesystem, is_glob
from imagemill.planning.auto_cut import UNKNOWN_BATCH, auto_rows_per_shard

if TYPE_CHECKING:
    from imagemill.planning.image_listing import ImageListing

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# An input file: its URL, its stable name (file_key) and its footer, or why it cannot be read.
InputFile = tuple[str, str, "pq.FileMetaData | str"]
PARQUET_MAGIC = b"PAR1"


def file_key(relative_path: str) -> str:
    """A name for an input file that is safe in object keys and unique for distinct relative paths."""
    stem = relative_path.removesuffix(".parquet")
    safe = _UNSAFE_NAME_CHARS.sub("_", stem)
    if safe == stem and "/" not in relative_path:
        return safe
    return f"{safe}-{hashlib.sha256(relative_path.encode()).hexdigest()[:8]}"


def _is_parquet(fs, path: str) -> bool:
    """A file a glob takes: named *.parquet, or starting with Parquet's magic bytes (README.txt and
    _SUCCESS markers next to the data are not)."""
    if path.endswith(".parquet"):
        return True
    with fs.open(path, "rb", cache_type="none") as f:
        return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def list_input_files(spec: InputSpec) -> tuple[list[str], str]:
    """The Parquet files named by a file, a folder or a glob, sorted, and the root they are relative to."""
    fs, path = filesystem(spec.path, spec.storage_options)
    if (under := files_under(fs, path)) is not None:
        found, root = under
        # a glob also takes files that start with Parquet's magic; a folder, *.parquet only
        keep = (lambda f: _is_parquet(fs, f)) if is_glob(path) else (lambda f: f.endswith(".parquet"))
        files = [f for f in found if keep(f)]
    elif fs.isfile(path):
        files = [path]
        root = path.rpartition("/")[0]
    else:
        raise ImagemillError(f"input path does not exist: {spec.path}")
    if not files:
        raise ImagemillError(
            f"no Parquet files found at {spec.path} (a folder is searched for *.parquet; a glob takes "
            "*.parquet files and files that start with Parquet's PAR1 magic)"
        )
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
    (imagemill.planning.inputs says why the footer)."""
    sink = pa.BufferOutputStream()
    metadata.write_metadata_file(sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _missing_prompt_column(spec: InputSpec, url: str, metadata: pq.FileMetaData) -> str | None:
    """Why the file cannot give prompts, in one line naming it and the column, or None when it can."""
    columns = metadata.schema.names
    for setting, column, holds in (
        ("prompt_column", spec.prompt_column, "the prompts"),
        ("image_column", spec.image_column, "the source images"),
        ("mask_column", spec.mask_column, "the inpainting masks"),
        ("reference_column", spec.reference_column, "the high-resolution references"),
    ):
        if column is not None and column not in columns:
            return (
                f"{setting.split('_')[0]} column '{column}' not found in {url}; columns found: "
                f"{', '.join(columns)}. Set input.{setting} to the column that holds {holds}."
            )
    return None


def _shard(url: str, key: str, groups: tuple[int, int], first_row: int, num_rows: int) -> Shard:
    """Whole row groups [start, end): id `<file>-rg<start>-<end>`, as every imagemill has named them."""
    start, end = groups
    return Shard(f"{key}-rg{start:05d}-{end:05d}", url, key, start, end, first_row, num_rows)


def _piece_starts(group_rows: int, rows_per_shard: int) -> list[int]:
    """Where the pieces of a row group begin: every rows_per_shard rows, the last piece taking the
    remainder when that would be under half a shard. One start: the row group stays whole."""
    starts = list(range(0, group_rows, rows_per_shard))
    if len(starts) > 1 and group_rows - starts[-1] < rows_per_shard / 2:
        starts.pop()
    return starts


def _pieces(
    url: str, key: str, group: int, first_row: int, starts: list[int], group_rows: int
) -> list[Shard]:
    """A row group cut at `starts`. Ids `<file>-rg<group>-r<first>-<end>` count rows within the row
    group, so they never meet a whole-row-group id."""
    ends = [*starts[1:], group_rows]
    return [
        Shard(
            shard_id=f"{key}-rg{group:05d}-r{start:09d}-{end:09d}",
            file_url=url,
            file_key=key,
            row_group_start=group,
            row_group_end=group + 1,
            first_row=first_row + start,
            num_rows=end - start,
            row_offset=start,
        )
        for start, end in zip(starts, ends, strict=True)
    ]


def _shards_of_file(
    url: str, key: str, metadata: pq.FileMetaData, rows_per_shard: int, cut: bool = True
) -> list[Shard]:
    """Row groups gathered into shards of at least rows_per_shard rows (the last one may be smaller).
    With `cut`, a row group larger than that ends the gathering before it and is cut into pieces."""
    shards: list[Shard] = []
    start, first_row, rows = 0, 0, 0
    for index in range(metadata.num_row_groups):
        group_rows = metadata.row_group(index).num_rows
        starts = _piece_starts(group_rows, rows_per_shard) if cut else [0]
        if len(starts) > 1:
            if rows:
                shards.append(_shard(url, key, (start, index), first_row, rows))
            shards += _pieces(url, key, index, first_row + rows, starts, group_rows)
            start, first_row, rows = index + 1, first_row + rows + group_rows, 0
            continue
        rows += group_rows
        is_last = index == metadata.num_row_groups - 1
        if rows >= rows_per_shard or (is_last and rows > 0):
            shards.append(_shard(url, key, (start, index + 1), first_row, rows))
            start, first_row, rows = index + 1, first_row + rows, 0
    return shards


def _parquet_inputs(spec: InputSpec) -> list[InputFile]:
    """The input's Parquet files, each with its stable name and its footer (or why it is unreadable)."""
    fs, _ = filesystem(spec.path, spec.storage_options)
    files, root = list_input_files(spec)
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda path: _read_footer(fs, path), files))
    return [
        (fs.unstrip_protocol(path), file_key(path[len(root) :].lstrip("/") if root else path), metadata)
        for path, metadata in zip(files, footers, strict=True)
    ]


def plan_shards(
    spec: InputSpec,
    auto_cut: Callable[[int], int] | None = None,
    min_shards: Callable[[], int] = lambda: 1,
    listing: ImageListing | None = None,
) -> ShardPlan:
    """List the input, check every file's columns, and cut it into shards of about rows_per_shard rows.

    With `rows_per_shard: auto`, `auto_cut` gives the number from the readable files' row count
    (imagemill.planning.auto_cut; without it, the cut for one worker), lowered where the row groups'
    layout would make fewer shards than `min_shards()` (the workers) asks and the rows allow; the plan
    says which number it cut by. A file without the prompt
    column fails alone, like a corrupt one; when no readable file has it, the setting is wrong and
    the job stops, naming the first file. With `listing` (input.format: images), its listings are
    the input files."""
    inputs = listing.files if listing is not None else _parquet_inputs(spec)
    urls = []
    unreadable: list[UnreadableFile] = []
    digests: dict[str, str] = {}
    readable: list[tuple[str, str, pq.FileMetaData]] = []
    no_prompts: list[str] = []
    schemas: list[tuple[str, pa.Schema]] = []  # of the files with prompts, for the carried columns
    for url, key, metadata in inputs:
        urls.append(url)
        problem = metadata if isinstance(metadata, str) else _missing_prompt_column(spec, url, metadata)
        if problem is not None:
            unreadable.append(UnreadableFile(f"{key}-unreadable", url, problem))
            if not isinstance(metadata, str):
                no_prompts.append(problem)
            continue
        digests[url] = footer_digest(metadata)
        schemas.append((url, metadata.schema.to_arrow_schema()))
        readable.append((url, key, metadata))
    if no_prompts and not digests:
        raise ImagemillError(no_prompts[0])
    check_carried(spec, schemas)
    rows_per_shard = spec.rows_per_shard
    if rows_per_shard == "auto":
        rows = sum(metadata.num_rows for _, _, metadata in readable)
        rows_per_shard = auto_cut(rows) if auto_cut else auto_rows_per_shard(rows, 1, UNKNOWN_BATCH)
        # Remainders merged into a row group's last piece, or small row groups gathered, can make fewer
        # shards than workers: then the largest smaller cut that gives each worker one. The shards are
        # a function of the input and the number alone, so a resume, cut by the recorded number, cuts
        # the same ones.
        wanted = min(min_shards(), rows)
        while rows_per_shard > 1 and _shard_count(readable, rows_per_shard) < wanted:
            rows_per_shard -= 1
    shards: list[Shard] = []
    whole: dict[str, list[Shard]] = {}
    for url, key, metadata in readable:
        file_shards = _shards_of_file(url, key, metadata, rows_per_shard)
        if any(shard.row_offset is not None for shard in file_shards):
            whole[url] = _shards_of_file(url, key, metadata, rows_per_shard, cut=False)
        shards.extend(file_shards)
    return ShardPlan(
        shards=shards,
        files=urls,
        unreadable=unreadable,
        footers=digests,
        whole_group_shards=whole,
        rows_per_shard=rows_per_shard,
        new_listing=listing.new if listing is not None else None,
    )


def _shard_count(readable: list[tuple[str, str, pq.FileMetaData]], rows_per_shard: int) -> int:
    return sum(len(_shards_of_file(url, key, metadata, rows_per_shard)) for url, key, metadata in readable)


def resume_whole_group_shards(plan: ShardPlan, committed: set[str]) -> ShardPlan:
    """The plan with each file that has a committed whole-row-group shard the plan no longer makes
    (an output made before row groups were cut into pieces) planned as then, so it resumes as it began."""
    planned = {shard.shard_id for shard in plan.shards}
    old = {
        url: shards
        for url, shards in plan.whole_group_shards.items()
        if any(s.shard_id in committed and s.shard_id not in planned for s in shards)
    }
    if not old:
        return plan
    shards = [s for s in plan.shards if s.file_url not in old] + [s for v in old.values() for s in v]
    order = {url: index for index, url in enumerate(plan.files)}
    shards.sort(key=lambda s: (order[s.file_url], s.first_row))
    return replace(plan, shards=shards)
