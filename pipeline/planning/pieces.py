"""The run's piece server: started by the driver when the shards to run include pieces of row groups.

A row group larger than `rows_per_shard` is cut into pieces (imagemill.planning.shards); one `PieceServer`
actor (imagemill.workers.pieces) reads each such row group once and hands the pieces to the workers,
which find it by the name the driver writes on each piece.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import ray

from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.workers.actors import PieceServerActor

RESTARTS = 3  # its state is a cache: a restarted server reads row groups again on demand


@contextmanager
def serving_pieces(spec: JobSpec, shards: list[Shard]) -> Iterator[list[Shard]]:
    """The shards, pieces carrying the name of the server started for them; stopped on exit."""
    pieces = [(s.file_url, s.row_group_start, s.row_offset) for s in shards if s.row_offset is not None]
    if not pieces:
        yield shards
        return
    name = f"imagemill:{spec.name}:pieces:{uuid.uuid4().hex[:6]}"
    server = (
        ray.remote(PieceServerActor)
        .options(
            name=name,
            num_cpus=0,  # it must not take a worker's CPU slot; it reads while workers wait for it
            max_concurrency=8,
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
        )
        .remote(spec.shard_input(), pieces)
    )
    try:
        yield [replace(s, piece_server=name) if s.row_offset is not None else s for s in shards]
    finally:
        ray.kill(server)
