"""The actor's post-generation stages, built from the spec in one place, in the stage table's order.

The rows are imagemill.core.stage_table.POST_GENERATION (names, labels, threads and classes, shared
with the driver's report); `register` adds a row at run time, for a stage kept outside the package
(a test's, a plugin's). `build_stages` is the only place an actor decides which stages it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

from imagemill.core.records import MetadataRow
from imagemill.core.spec import JobSpec
from imagemill.core.stage_table import POST_GENERATION, StageRow
from imagemill.workers.generators.contract import Generator
from imagemill.workers.stages.contract import BatchStage, DrawBatch, Stage, StageContext

_registered: list[tuple[StageRow, type[Stage], str | None]] = []  # row, class, the row it goes before


def register(row: StageRow, stage: type[Stage], before: str | None = None) -> None:
    """Add a post-generation stage not in the table: built after the table's stages, or just before
    the one named `before`. Its seconds are reported under `row.name`."""
    _registered.append((row, stage, before))


def unregister(name: str) -> None:
    """Remove a stage `register` added."""
    _registered[:] = [entry for entry in _registered if entry[0].name != name]


def stage_class(row: StageRow) -> type[Stage]:
    """The class a table row names (`module:Class`)."""
    assert row.implementation is not None, row
    module, _, name = row.implementation.partition(":")
    stage: type[Stage] = getattr(importlib.import_module(module), name)
    return stage


def stage_rows() -> list[tuple[StageRow, type[Stage]]]:
    """Every post-generation stage, in the order they run."""
    rows = [(row, stage_class(row)) for row in POST_GENERATION]
    for row, stage, before in _registered:
        names = [known.name for known, _ in rows]
        rows.insert(names.index(before) if before in names else len(rows), (row, stage))
    return rows


@dataclass
class ActorStages:
    """The stages one actor runs, by name, in order."""

    stages: dict[str, Stage] = field(default_factory=dict)

    def on_batches(self) -> list[tuple[str, BatchStage]]:
        """The stages run on each chunk of draws (device thread), named as the timer charges them."""
        return [(name, stage) for name, stage in self.stages.items() if isinstance(stage, BatchStage)]

    def get(self, name: str) -> Stage | None:
        return self.stages.get(name)

    @property
    def new_columns(self) -> tuple[str, ...]:
        """The metadata columns stages fill that MetadataRow has not (a registered stage's), in stage
        order: appended to the metadata Parquet from each kept draw's `columns`."""
        known = {column.name for column in dataclasses.fields(MetadataRow)}
        return tuple(c for stage in self.stages.values() for c in stage.columns if c not in known)


def build_stages(spec: JobSpec, device: str, generator: Generator) -> ActorStages:
    """The stages `spec` enables, built in order; each may share the models of those built before it.
    Raises ValueError when a stage needs a batch field no stage before it adds (a table error)."""
    built = ActorStages()
    available = set(DrawBatch.GIVEN)
    for row, stage_type in stage_rows():
        stage = stage_type.from_spec(spec, StageContext(device, generator, built.stages))
        if stage is None:
            continue
        missing = set(stage.needs) - available
        if missing:
            raise ValueError(f"stage {row.name} needs {sorted(missing)}, which no stage before it adds")
        available |= set(stage.adds)
        built.stages[row.name] = stage
    return built
