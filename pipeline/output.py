"""The output layout, the one place that knows where each file of a job goes.

    OUTPUT/
      _job.json                     job record: spec (storage options redacted), versions, times, counts
      _SUCCESS                      written when every shard is committed
      images/<shard_id>/<name>.png  format `files`: one image per ok row; <name> from the row id (image_name)
      webdataset/<shard_id>.tar     format `webdataset`: <key>.<ext> + <key>.json per ok row (sample_key)
      data/<shard_id>.parquet       format `parquet`: ok rows with an `image` column, readable by `datasets`
      metadata/<shard_id>.parquet   one row per input row: id, prompt, seed, status, error, path, ...
      shards/<shard_id>.json        the shard's stats; written last, so its presence commits the shard

Whatever the format, a shard's images are written first, then its metadata, then its stats.

Actors write images, metadata and stats; the driver writes the job record and the marker.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from imagemill.storage import filesystem, join, retrying

_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

JOB_RECORD = "_job.json"
SUCCESS_MARKER = "_SUCCESS"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
IMAGE_FOLDERS = {"files": "images", "webdataset": "webdataset", "parquet": "data"}  # by output.format


def image_name(row_id: str) -> str:
    """A file name for any row id that cannot leave its folder and cannot collide with another id's.

    Plain ids (letters, digits, '.', '_', '-', no '..') are used as they are. Any other id is cleaned
    and suffixed with '~' and a hash of the id: '~' never occurs in a plain id, so the two kinds of
    names cannot meet, and the hash keeps distinct ids distinct after cleaning.
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
    def tar_path(shard_id: str) -> str:
        return f"webdataset/{shard_id}.tar"

    @staticmethod
    def data_path(shard_id: str) -> str:
        return f"data/{shard_id}.parquet"

    @staticmethod
    def metadata_path(shard_id: str) -> str:
        return f"metadata/{shard_id}.parquet"

    @staticmethod
    def stats_path(shard_id: str) -> str:
        return f"shards/{shard_id}.json"

    def prepare_shard(self, shard_id: str, output_format: str = "files") -> None:
        """Create the folders a shard writes into (object stores need none; local disks do)."""
        images = f"images/{shard_id}" if output_format == "files" else IMAGE_FOLDERS[output_format]
        for folder in (images, "metadata", "shards"):
            self.fs.makedirs(self.path(folder), exist_ok=True)

    def write_bytes(self, relative: str, data: bytes) -> None:
        path = self.path(relative)
        retrying(lambda: self.fs.pipe_file(path, data), f"writing {path}")

    def write_json(self, relative: str, record: dict[str, Any]) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.write_bytes(relative, json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode())

    def remove(self, relative: str) -> None:
        path = self.path(relative)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> None:
        """Delete a previous job's output: only imagemill's own files, never anything else there."""
        for relative in (
            SUCCESS_MARKER,
            REPORT_JSON,
            REPORT_HTML,
            "shards",
            "metadata",
            *IMAGE_FOLDERS.values(),
            JOB_RECORD,
        ):
            self.remove(relative)

    def read_json(self, relative: str) -> dict[str, Any] | None:
        path = self.path(relative)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def committed_stats(self) -> dict[str, dict[str, Any]]:
        """Stats of every committed shard, by shard id."""
        folder = self.path("shards")
        self.fs.invalidate_cache(folder)  # listings are cached per process; other processes wrote here
        if not self.fs.isdir(folder):
            return {}
        files = [f for f in self.fs.ls(folder, detail=False) if f.endswith(".json")]
        records = [json.loads(data) for data in (self.fs.cat(files) if files else {}).values()]
        return {record["shard_id"]: record for record in records}
