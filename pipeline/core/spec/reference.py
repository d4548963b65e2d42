"""docs/spec.md, the job spec's reference page, made from JobSpec's fields: `python -m
imagemill.core.spec.reference docs/spec.md` writes it. tests/test_spec_reference.py fails when the
committed page differs, so a field's description is written once, in its section, and the page follows.

It imports the spec (pydantic) and nothing else: no model library, no Ray.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from imagemill.core.spec.job import JobSpec
from imagemill.core.spec.markers import NOT_FINGERPRINTED, REDACTED, STORAGE_OPTION

COMMAND = "python -m imagemill.core.spec.reference docs/spec.md"
HEADER = f"""# The job spec

<!-- Generated from imagemill.core.spec by `{COMMAND}`; do not edit. -->

A job is one YAML file; every field can also be set with `--set section.field=value`. Local paths are
made absolute where the driver reads the spec, and `{{date}}` in the name and the input and output
paths becomes the day (YYYY-MM-DD, UTC). Fields marked *resumable* are not in the fingerprint: they may
change when a job resumes into the same output; every other field must stay as it was. *Redacted*
fields never appear in logs or the job record.
"""


def reference() -> str:
    """The whole page, sections in JobSpec's order, each followed by the sections nested in it."""
    parts = [HEADER, _table(JobSpec, "")]
    for name, section in _sections(JobSpec):
        parts += _section_pages(section, name)
    return "\n".join(parts)


def _section_pages(model: type[BaseModel], dotted: str) -> list[str]:
    doc = (model.__doc__ or "").strip()
    pages = [f"## `{dotted}`\n", *([" ".join(doc.split()) + "\n"] if doc else []), _table(model, dotted)]
    for name, section in _sections(model):
        pages += _section_pages(section, f"{dotted}.{name}")
    return pages


def _sections(model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """The fields of `model` that hold a section (or a list of them), with the section's class."""
    found = []
    for name, field in model.model_fields.items():
        section = next((arg for arg in _leaves(field.annotation) if _is_section(arg)), None)
        if section is not None:
            found.append((name, section))
    return found


def _table(model: type[BaseModel], dotted: str) -> str:
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        shown = f"{dotted}.{name}" if dotted else name
        cells = (
            f"`{name}`",
            _type_text(field.annotation) + _bounds(field),
            _default_text(field),
            _description(field, shown),
        )
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _description(field: FieldInfo, shown: str) -> str:
    text = " ".join((field.description or "").split())
    if any(_is_section(arg) for arg in _leaves(field.annotation)):
        text = f"{text} See `{shown}` below.".strip()
    notes = [
        note
        for marker, note in (
            (STORAGE_OPTION, "storage option"),
            (REDACTED, "redacted"),
            (NOT_FINGERPRINTED, "resumable"),
        )
        if marker in field.metadata
    ]
    return text + (f" *({', '.join(notes)})*" if notes else "")


def _type_text(annotation: Any) -> str:
    """The type as a user writes it: `png \\| jpeg`, list of text, number or null."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in get_args(annotation))
    if origin is list:
        return f"list of {_type_text(get_args(annotation)[0])}"
    if origin is dict or annotation is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if _is_section(annotation):
        return "section"
    return {str: "text", int: "integer", float: "number", bool: "true | false"}.get(
        annotation, str(annotation)
    )


def _bounds(field: FieldInfo) -> str:
    """The field's numeric limits (gt=0, le=100) as `, > 0, <= 100`."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return "".join(
        f", {sign} {getattr(limit, name)}"
        for limit in field.metadata
        for name, sign in signs.items()
        if isinstance(getattr(limit, name, None), int | float)
    )


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section defaults)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"


def _leaves(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    return [leaf for arg in args for leaf in _leaves(arg)] if args else [annotation]


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {COMMAND}")
    Path(sys.argv[1]).write_text(reference(), encoding="utf-8")
