"""The output layout, the one place that knows where each file of a job goes.

    OUTPUT/
      _job.json                     job record: spec (storage options redacted), versions, times, counts
      _SUCCESS                      written when every shard is committed
      images/<shard_id>/<name>.png  one image per ok row; <name> comes from the row id (see image_name)
      metadata/<shard_id>.parquet   one row per input row: id, prompt, seed, status, error, path, ...
      shards/<shard_id>.json        the shard's stats; written last, so its presence commits the shard

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
    def metadata_path(shard_id: str) -> str:
        return f"metadata/{shard_id}.parquet"

    @staticmethod
    def stats_path(shard_id: str) -> str:
        return f"shards/{shard_id}.json"

    def prepare_shard(self, shard_id: str) -> None:
        """Create the folders a shard writes into (object stores need none; local disks do)."""
        for folder in (f"images/{shard_id}", "metadata", "shards"):
            self.fs.makedirs(self.path(folder), exist_ok=True)

    def write_bytes(self, relative: str, data: bytes) -> None:
        path = self.path(relative)
        retrying(lambda: self.fs.pipe_file(path, data), f"writing {path}")

    def write_json(self, relative: str, record: dict[str, Any]) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self.write_bytes(relative, json.dumps(record, indent=2, sort_keys=True).encode())

    def remove(self, relative: str) -> None:
        path = self.path(relative)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> None:
        """Delete a previous job's output: only imagemill's own files, never anything else there."""
        for relative in (SUCCESS_MARKER, "shards", "metadata", "images", JOB_RECORD):
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
