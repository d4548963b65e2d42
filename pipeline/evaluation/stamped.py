"""The evaluation's derived Parquet files (near-duplicates, leakage, the reference's features), each
stamped in its schema metadata with what it was computed from, so a re-run with the same basis reads
it instead of computing it again, and one with another basis does not trust it."""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.core.layout import OutputLayout, parquet_bytes
from imagemill.core.write_gate import OwnedOutput

log = logging.getLogger(__name__)


def stamp_of(basis: dict[str, Any]) -> bytes:
    return json.dumps(basis, sort_keys=True).encode()


def read_stamped(output: OutputLayout, name: str, basis: dict[str, Any]) -> pa.Table | None:
    """The output's file `name` when it was made from this basis, else None (made again by the caller).

    The stamp is read from the footer first, so a file of another basis is not read whole. A file that
    does not read as Parquet (one written before writes were whole, cut short) counts as absent.
    """
    path = output.path(name)
    try:
        with output.fs.open(path, "rb") as f:
            if (pq.read_schema(f).metadata or {}).get(b"imagemill") != stamp_of(basis):
                return None
            f.seek(0)
            return pq.read_table(f)
    except FileNotFoundError:
        return None
    except pa.ArrowInvalid as exc:
        log.warning("%s does not read as Parquet (%s): making it again", path, exc)
        return None


def write_stamped(output: OwnedOutput, name: str, table: pa.Table, basis: dict[str, Any]) -> pa.Table:
    """Write the table as the output's file `name`, whole, stamped with its basis; returns it stamped."""
    table = table.replace_schema_metadata({b"imagemill": stamp_of(basis)})
    output.write_whole(name, parquet_bytes(table))
    return table
