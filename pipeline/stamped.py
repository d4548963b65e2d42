"""The evaluation's derived Parquet files (near-duplicates, leakage, the reference's features), each
stamped in its schema metadata with what it was computed from, so a re-run with the same basis reads
it instead of computing it again, and one with another basis does not trust it."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.output import OutputLayout
from imagemill.workers.writers import parquet_bytes


def stamp_of(basis: dict[str, Any]) -> bytes:
    return json.dumps(basis, sort_keys=True).encode()


def read_stamped(output: OutputLayout, name: str, basis: dict[str, Any]) -> pa.Table | None:
    """The output's file `name` when it was made from this basis, else None."""
    try:
        with output.fs.open(output.path(name), "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        return None
    return table if (table.schema.metadata or {}).get(b"imagemill") == stamp_of(basis) else None


def write_stamped(output: OutputLayout, name: str, table: pa.Table, basis: dict[str, Any]) -> pa.Table:
    """Write the table as the output's file `name`, stamped with its basis; returns it stamped."""
    table = table.replace_schema_metadata({b"imagemill": stamp_of(basis)})
    output.write_bytes(name, parquet_bytes(table))
    return table
