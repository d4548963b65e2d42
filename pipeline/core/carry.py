"""Input columns carried through to the outputs (`input.carry_columns`), with their Arrow types.

A training set needs its labels beside its images: `label`, `class_name`, `split` are copied from the
input row into the metadata Parquet, each WebDataset sample's JSON and the `parquet` format's rows.
`MetadataRow` is a fixed dataclass, so carried columns are extra Arrow columns appended after the
fixed ones, typed as in the input file. The driver checks every input file's footer when it plans
(`check_carried`): a carried name that an output already uses, a column missing from a file, or one
whose type differs between files would give outputs a reader cannot load as one dataset, so each is
refused in one line. Spark and DuckDB ignore case in column names and cannot read an empty one, so
names are compared case-folded: a listed name that is an output's column in another case (`ID`),
two carried names that differ only in case, and an empty name are refused too. "*" skips an input
column that is an output's column in any case, as it skips the exact name, and refuses the others.
Actors read the carried columns with the shard (`carried_columns`) and keep them in a `Carried`,
which maps each output row (image) back to its input row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from imagemill.core.errors import ImagemillError
from imagemill.core.records import FORMAT_COLUMNS, metadata_schema
from imagemill.core.spec import InputSpec
from imagemill.core.stage_table import STAGE_COLUMNS

# Names an output already has: the metadata columns (`key` included), those a stage adds (whether
# or not the job runs it), the parquet format's `image` and the WebDataset JSON's `parameters`. A
# carried column of one of these names would overwrite it.
RESERVED_NAMES = frozenset({*metadata_schema(FORMAT_COLUMNS).names, *STAGE_COLUMNS, "image", "parameters"})
# The same names as readers that ignore case see them: case-folded name -> the output's own name.
_RESERVED_FOLDED = {name.casefold(): name for name in RESERVED_NAMES}


def _own_columns(spec: InputSpec) -> set[str]:
    """The input columns the job reads for itself; never carried."""
    return {name for name in (spec.prompt_column, spec.id_column) if name is not None}


def carried_columns(spec: InputSpec, names: Sequence[str]) -> list[str]:
    """The carried columns of a file (or table) with these columns: those listed, in their order, or
    with "*" every column that is neither the job's own (prompt, id) nor a name the outputs already
    have, in any case (the per-row parameters such as `seed`, which the metadata records anyway), by
    name (so files whose columns come in another order give the same output columns)."""
    if spec.carry_columns != "*":
        return list(spec.carry_columns)
    own = _own_columns(spec)
    return sorted(name for name in names if name not in own and name.casefold() not in _RESERVED_FOLDED)


def _leave_out(spec: InputSpec) -> str:
    """How to stop carrying a column: drop it from the list, or list the columns instead of "*"."""
    return (
        "leave it out of carry_columns" if spec.carry_columns != "*" else 'list the columns to carry, not "*"'
    )


def _check_name(spec: InputSpec, name: str, url: str) -> None:
    """Refuse a name that is empty, the prompt/id column, or (in any case) one the outputs already have."""
    if not name:
        raise ImagemillError(
            f"input.carry_columns: a column of {url} has an empty name, which Spark and DuckDB cannot "
            f"read; rename it in the input or {_leave_out(spec)}"
        )
    if name in _own_columns(spec):
        raise ImagemillError(
            f"input.carry_columns: '{name}' is the job's prompt or id column ({url}); "
            "it is in the outputs already, remove it from carry_columns"
        )
    if (output := _RESERVED_FOLDED.get(name.casefold())) is not None:
        raise ImagemillError(
            f"input.carry_columns: '{name}' of {url} clashes with the output column '{output}' "
            "(readers ignore case); rename it in the input or leave it out"
        )


def _check_cases(spec: InputSpec, schemas: Sequence[tuple[str, pa.Schema]], names: Sequence[str]) -> None:
    """Refuse carried names that differ only in case (naming the first file that has the second):
    Spark and DuckDB read them as one column."""
    first: dict[str, str] = {}
    for name in names:
        other = first.setdefault(name.casefold(), name)
        if other != name:
            url = next((url for url, schema in schemas if name in schema.names), schemas[0][0])
            raise ImagemillError(
                f"input.carry_columns: columns '{other}' and '{name}' ({url}) differ only in case, which "
                f"Spark and DuckDB read as one column; rename one in the input or {_leave_out(spec)}"
            )


def check_carried(spec: InputSpec, schemas: Sequence[tuple[str, pa.Schema]]) -> None:
    """Refuse, in one line naming the file and the column, carried columns the outputs cannot hold:
    a reserved name or the prompt/id column, a column missing from a file (with "*": one that
    another file carries), a type that differs between files, and a label column not carried."""
    if not spec.carry_columns or not schemas:
        return
    wanted = list(dict.fromkeys(n for _, schema in schemas for n in carried_columns(spec, schema.names)))
    label = spec.label_column
    if label is not None and label not in wanted:
        raise ImagemillError(
            f"input.label_column: column '{label}' is not in {schemas[0][0]}; add it there or unset it"
        )
    _check_cases(spec, schemas, wanted)
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for url, schema in schemas:
        for name in wanted:
            _check_name(spec, name, url)
            if name not in schema.names:
                raise ImagemillError(
                    f"input.carry_columns: column '{name}' is missing from {url} "
                    f"(columns there: {', '.join(schema.names)}); add it there or leave it out"
                )
            kind = schema.field(name).type
            first = seen.setdefault(name, (kind, url))
            if first[0] != kind:
                raise ImagemillError(
                    f"input.carry_columns: column '{name}' is {first[0]} in {first[1]} but {kind} in "
                    f"{url}; write it with one type in every input file"
                )


def _json_value(value: Any) -> Any:
    """A value JSON holds: non-finite floats become null (JSON has none), nested values likewise;
    anything else JSON lacks (dates, bytes) becomes its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass(frozen=True)
class Carried:
    """A shard's carried columns (one row per input row of the shard) and, for each of its output
    rows in shard order, the input row it came from (an input row has one output row per variant
    and image)."""

    table: pa.Table
    sources: list[int]

    @classmethod
    def none(cls) -> Carried:
        """No carried column (and no row map): what writers get when nothing is carried."""
        return cls(pa.table({}), [])

    def take(self, positions: Iterable[int]) -> pa.Table:
        """The carried columns of these output rows, typed as in the input (no column: nothing carried)."""
        if not self.table.num_columns:
            return self.table
        return self.table.take([self.sources[position] for position in positions])

    def value(self, name: str, position: int) -> Any:
        """Column `name` of output row `position`, as a Python value."""
        return self.table.column(name)[self.sources[position]].as_py()

    def json_values(self, position: int) -> dict[str, Any]:
        """The carried columns of output row `position`, as values JSON holds."""
        return {name: _json_value(self.value(name, position)) for name in self.table.column_names}


def append_columns(table: pa.Table, extra: pa.Table) -> pa.Table:
    """`table` with the columns of `extra` (same row count) after its own; its schema metadata kept."""
    for name, column in zip(extra.column_names, extra.columns, strict=True):
        table = table.append_column(extra.schema.field(name), column)
    return table
