"""Reading a shard's rows from Parquet: whole row groups straight from storage, or a piece of a row
group larger than a shard from the run's `PieceServer`.

pyarrow reads a row group's column chunk whole: it has no row-range read over the page index
(apache/arrow#38865, open), and pandas and most writers write no page index anyway. So a row group
cut into pieces (imagemill.planning.shards) would be read once per piece if each actor read its own. The
driver starts one `PieceServer` per run instead (imagemill.planning.pieces): it reads each such row group
once, with only the columns the job uses, hands each actor its piece, and forgets the row group
once every piece the run planned has been handed out. A piece asked for again (a retried shard)
reads the row group again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.core.carry import carried_columns
from imagemill.core.shard import Shard
from imagemill.core.spec import InputSpec
from imagemill.core.storage import filesystem, retrying

GroupKey = tuple[str, int]  # (file URL, row group)


def read_row_groups(file_url: str, groups: Iterable[int], spec: InputSpec, wanted: list[str]) -> pa.Table:
    """The row groups of a file, with the `wanted` columns it has (in that order), then the carried ones
    (imagemill.core.carry)."""
    fs, path = filesystem(file_url, spec.storage_options)

    def read() -> pa.Table:
        # No fsspec read-ahead: pyarrow asks for exactly the column chunks it needs.
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            present = set(names)
            wanted_here = [*wanted, *carried_columns(spec, names)]
            columns = [name for name in dict.fromkeys(wanted_here) if name in present]
            return parquet.read_row_groups(list(groups), columns=columns)

    return retrying(read, f"reading {file_url}")


def _ipc_bytes(table: pa.Table) -> bytes:
    """The table as an Arrow IPC stream: a slice is written as its own rows only (pickling a slice
    may carry its parent's whole buffers)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class PieceServer:
    """One per run (a Ray actor): serves pieces of the row groups the run cut into pieces.

    `pieces`: (file URL, row group, first row in the row group) of every piece the run will ask for.
    """

    def __init__(self, spec: InputSpec, wanted: list[str], pieces: list[tuple[str, int, int]]):
        self.spec = spec
        self.wanted = wanted
        self.pending: dict[GroupKey, set[int]] = {}
        for url, group, offset in pieces:
            self.pending.setdefault((url, group), set()).add(offset)
        self.tables: dict[GroupKey, pa.Table] = {}
        self.locks: dict[GroupKey, threading.Lock] = {}
        self.locks_lock = threading.Lock()
        self.groups_read = 0

    def piece(self, url: str, group: int, offset: int, num_rows: int) -> bytes:
        """Rows offset..offset+num_rows of the row group, as an Arrow IPC stream."""
        key = (url, group)
        with self.locks_lock:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:
            table = self.tables.get(key)
            if table is None:
                table = read_row_groups(url, [group], self.spec, self.wanted)
                self.groups_read += 1
            pending = self.pending.get(key, set())
            pending.discard(offset)
            if pending:
                self.tables[key] = table
            else:
                self.tables.pop(key, None)
        return _ipc_bytes(table.slice(offset, num_rows))

    def stats(self) -> dict[str, int]:
        """Row groups read so far and row groups held now."""
        return {"groups_read": self.groups_read, "groups_held": len(self.tables)}


_servers: dict[str, Any] = {}  # this process's handles, by actor name


def read_piece(shard: Shard) -> pa.Table:
    """A piece's rows, from the run's PieceServer (its name is on the shard). Ray is imported here:
    a shard worker run in-process, without Ray (bench/gpu.sh), reads its piece's row group itself
    (imagemill.workers.rows.read_shard)."""
    import ray

    server = _servers.get(shard.piece_server)
    if server is None:
        server = _servers[shard.piece_server] = ray.get_actor(shard.piece_server)
    call = server.piece.remote(shard.file_url, shard.row_group_start, shard.row_offset, shard.num_rows)
    try:
        data = ray.get(call)
    except ray.exceptions.RayActorError as exc:  # else the driver would take this worker for dead
        raise RuntimeError(f"the piece server died and could not be restarted: {exc}") from None
    return pa.ipc.open_stream(data).read_all()
