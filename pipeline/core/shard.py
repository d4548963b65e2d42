"""Shard descriptors: what the driver hands an actor (never data, only where its rows are), and the plan
of a run (imagemill.planning.shards makes it; the output rules and the resume rules read it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shard:
    shard_id: str
    file_url: str
    file_key: str  # the input file's stable name; derived row ids start with it
    row_group_start: int
    row_group_end: int  # exclusive
    first_row: int  # index in the file of the shard's first row
    num_rows: int
    # A piece: the shard is num_rows rows of row group row_group_start from this row of it on.
    # None: the shard is its row groups, whole.
    row_offset: int | None = None
    # The named actor that serves a piece's rows in this run (set by the driver when the run starts).
    piece_server: str = ""


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
    # Files with a row group cut into pieces → the whole-row-group shards imagemill cut them into
    # before pieces existed; an output that committed one of those resumes that file with them.
    whole_group_shards: dict[str, list[Shard]] = field(default_factory=dict)
    rows_per_shard: int = 0  # the cut it was made by (input.rows_per_shard, `auto` resolved)
    # input.format: images: the listing of the images no earlier run listed, (path in the output, its
    # bytes), which the run writes once it holds the output (imagemill.planning.image_listing)
    new_listing: tuple[str, bytes] | None = None

    @property
    def total_rows(self) -> int:
        return sum(shard.num_rows for shard in self.shards)
