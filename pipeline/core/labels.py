"""Per-label accounting: ok / filtered / error counts for each value of the job's label column.

A synthetic training set is judged class by class: a class whose prompts all fail, or whose images
the CLIP threshold filters away, leaves a hole the totals hide. Each shard's stats count its rows per
label (`ShardStats.labels`, made by the actor from its carried label column); the driver adds them up
(`merge_labels`) for `imagemill status` and the report, reading no metadata file. Labels are keyed
by text: a string label as it is, any other value (an int, a list, null) as its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

STATUSES = ("ok", "filtered", "error")
LABELS_SHOWN = 50  # labels `status` and the report list, and labels the report's samples cover


def label_key(value: Any) -> str:
    """The text a label is counted under."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def count_labels(pairs: Iterable[tuple[Any, str]]) -> dict[str, dict[str, int]]:
    """{label: {status: rows}} from (label value, status) pairs, labels in order of first sight."""
    counts: dict[str, dict[str, int]] = {}
    for value, status in pairs:
        row = counts.setdefault(label_key(value), dict.fromkeys(STATUSES, 0))
        row[status] += 1
    return counts


def merge_labels(per_shard: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """The shards' label counts added up, labels sorted by text."""
    total: dict[str, dict[str, int]] = {}
    for counts in per_shard:
        for label, statuses in counts.items():
            row = total.setdefault(label, dict.fromkeys(STATUSES, 0))
            for status in STATUSES:
                row[status] += int(statuses.get(status, 0))
    return dict(sorted(total.items()))


def label_lines(labels: Mapping[str, Mapping[str, int]], limit: int = LABELS_SHOWN) -> list[str]:
    """`label: N ok, N filtered, N error` per label, up to `limit`, then how many more there are."""
    lines = [
        f"{label}: " + ", ".join(f"{counts.get(status, 0)} {status}" for status in STATUSES)
        for label, counts in list(labels.items())[:limit]
    ]
    if len(labels) > limit:
        lines.append(f"… and {len(labels) - limit} more labels")
    return lines
