"""The output layout, the one place that knows where each file of a job goes.

    OUTPUT/
      _job.json                     job record: spec (storage options redacted), versions, times, counts
      _SUCCESS                      written when every shard is committed
      images/<shard_id>/<name>.png  format `files`: one image per ok row; <name> from the row id (image_name)
      webdataset/<shard_id>.tar     format `webdataset`: <key>.<ext> + <key>.json per ok row (sample_key)
      data/<shard_id>.parquet       format `parquet`: ok rows with an `image` column, readable by `datasets`
      metadata/<shard_id>.parquet   one row per input row: id, prompt, seed, status, error, path, ...
      embeddings/<shard_id>.parquet     `evaluation:` only: each written image's embedding (features.py)
      feature_stats/<shard_id>.parquet  `evaluation:` only: the shard's feature sums, for FID (features.py)
      duplicates.parquet, _reference_features.parquet   `evaluation:` only: near-duplicates, the
                                    reference's features (imagemill.evaluation.post_pass)
      shards/<shard_id>.json        the shard's stats; written last, so its presence commits the shard
      _input/listing-<n>.parquet    input.format: images: images listed by a run (planning/image_listing.py)
      attempts/<shard_id>.json      the shard's failed attempts and their device time (device_ledger.py)

Whatever the format, a shard's images are written first, then its metadata, then its stats.

Actors write images, metadata and stats; the driver writes the job record, the marker and the failed
attempts; every write goes through imagemill.core.write_gate (this module only names paths and reads).
Records (the JSON files) are written whole or not at all, and read back as absent when they do not
read; every call is on an exact path (see storage.py): an output folder may be called `run[12]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.core.storage import filesystem, join, list_folder, retrying

log = logging.getLogger(__name__)
_PLAIN_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

JOB_RECORD = "_job.json"
SUCCESS_MARKER = "_SUCCESS"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
DUPLICATES = "duplicates.parquet"  # the evaluation's near-duplicates (imagemill.evaluation.near_duplicates)
REFERENCE_FEATURES = "_reference_features.parquet"  # the evaluation's reference, embedded once
LEAKAGE = "leakage.parquet"  # generated images close to a reference image (imagemill.evaluation.leakage)
MARKERS = (
    JOB_RECORD,
    SUCCESS_MARKER,
    REPORT_JSON,
    REPORT_HTML,
    DUPLICATES,
    REFERENCE_FEATURES,
    LEAKAGE,
)  # at the root
# The live run's lease (imagemill.core.lease): imagemill's own, but never deleted by --overwrite.
LEASE_FILE = "_lease.json"
# Shard attempts staged before their create-only commit (imagemill.core.write_gate), on local disks.
STAGING_FOLDER = "_staging"
SUBMITTED = "_submitted.json"  # `imagemill submit`'s note for `status`, until the job writes its record
# input.format: images: each run's listing of the images no earlier run listed, written create-only.
LISTING_FOLDER = "_input"
LISTING_NAME = re.compile(r"listing-(?P<number>[0-9]{5})\.parquet")
IMAGE_FOLDERS = {"files": "images", "webdataset": "webdataset", "parquet": "data"}  # by output.format
# Folders holding one file per shard, <folder>/<shard_id><suffix> (images/ holds a folder per shard).
SHARD_FILE_SUFFIXES = {
    "webdataset": ".tar",
    "data": ".parquet",
    "metadata": ".parquet",
    "embeddings": ".parquet",
    "feature_stats": ".parquet",
    "shards": ".json",
    "attempts": ".json",
}


def image_name(row_id: str) -> str:
    """A file name for any row id that cannot leave its folder and cannot collide with another id's.

    Plain ids (lower-case letters, digits, '.', '_', '-', no '..') are used as they are. Any other id,
    one with an upper-case letter too, is cleaned and suffixed with '~' and a hash of the id: '~' never
    occurs in a plain id, so the two kinds of names cannot meet, and the hash keeps distinct ids
    distinct after cleaning. Upper case counts as not plain because `Abc` and `abc` are one file on a
    case-insensitive store (macOS, some mounts); the hash is lower-case hex, so names stay distinct
    after case-folding.
    """
    if _PLAIN_ID.fullmatch(row_id) and ".." not in row_id:
        return row_id
    cleaned = _UNSAFE.sub("_", row_id).replace("..", "_")[:80].strip("._-") or "id"
    return f"{cleaned}~{hashlib.sha256(row_id.encode()).hexdigest()[:16]}"


def sample_key(shard_id: str, position: int) -> str:
    """The WebDataset key of the row at `position` in its shard: `<shard_id>-<position:06d>`.

    Derived from the shard id and the row's position rather than the row id, because ids may repeat
    across shards while (shard, position) never does, and both are stable across runs. WebDataset
    cuts a member name at its first dot, so a shard id with dots (from an input file name) has them
    replaced by '_' and is suffixed with '~' and a hash of the shard id: '~' never occurs in a shard
    id, so such keys cannot meet plain ones, and the hash keeps distinct shard ids distinct.
    """
    if "." in shard_id:
        shard_id = f"{shard_id.replace('.', '_')}~{hashlib.sha256(shard_id.encode()).hexdigest()[:8]}"
    return f"{shard_id}-{position:06d}"


def _per_shard_file(folder: str) -> staticmethod:
    """The path of a shard's one file in `folder`: `<folder>/<shard_id><suffix>`."""
    suffix = SHARD_FILE_SUFFIXES[folder]
    return staticmethod(lambda shard_id: f"{folder}/{shard_id}{suffix}")


def _unreadable(path: str, problem: str, warn: bool) -> None:
    """A record that does not read counts as absent (never a crash), with a warning."""
    if warn:
        log.warning("%s is unreadable (%s); treating it as absent", path, problem)


class OutputLayout:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)

    def path(self, relative: str) -> str:
        return join(self.root, relative)

    @staticmethod
    def image_path(shard_id: str, row_id: str, extension: str) -> str:
        return f"images/{shard_id}/{image_name(row_id)}.{extension}"

    @staticmethod
    def listing_path(number: int) -> str:
        return f"{LISTING_FOLDER}/listing-{number:05d}.parquet"

    def listing_numbers(self) -> list[int]:
        """The numbers of the image listings the output holds, in order (other names are ignored)."""
        names = (
            LISTING_NAME.fullmatch(name)
            for name, folder in self.entries(LISTING_FOLDER).items()
            if not folder
        )
        return sorted(int(match["number"]) for match in names if match)

    # One file per shard in each of these folders, named by SHARD_FILE_SUFFIXES.
    tar_path = _per_shard_file("webdataset")
    data_path = _per_shard_file("data")
    metadata_path = _per_shard_file("metadata")
    embeddings_path = _per_shard_file("embeddings")
    feature_stats_path = _per_shard_file("feature_stats")
    stats_path = _per_shard_file("shards")
    attempts_path = _per_shard_file("attempts")  # failed attempts' device time (imagemill.core.device_ledger)

    def entries(self, relative: str = "") -> dict[str, bool]:
        """The names in a folder of the output (its root by default), each with whether it is a folder."""
        return list_folder(self.fs, self.path(relative) if relative else self.root)

    def read_bytes(self, relative: str, warn: bool = True) -> bytes | None:
        """A file's bytes, or None where there is none (or a folder is there, with a warning).

        Only what was read is judged: a storage error (a bad endpoint, no credentials) is raised.
        """
        path = self.path(relative)
        try:
            return retrying(lambda: self.fs.cat_file(path), f"reading {path}")
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: the output path is a file
            return None
        except IsADirectoryError:
            return _unreadable(path, "it is a folder", warn)

    def read_json(self, relative: str, warn: bool = True) -> dict[str, Any] | None:
        """A record, or None where there is none or it does not read as a JSON object.

        A record cut short (a full disk, a writer killed on a store without atomic writes) or someone
        else's file there must make the output look unfinished, never crash the job or `status`.
        """
        data = self.read_bytes(relative, warn)
        if data is None:
            return None
        path = self.path(relative)
        try:
            record = json.loads(data)
        except ValueError as exc:  # JSON and UTF-8 errors are ValueErrors
            return _unreadable(path, f"{type(exc).__name__}: {exc}", warn)
        if not isinstance(record, dict):
            return _unreadable(path, f"it holds a JSON {type(record).__name__}, not an object", warn)
        return record


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, for files written whole (records, evaluation files): the same bytes for
    the same table on every run."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()
