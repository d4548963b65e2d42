"""What a spec field is, declared once on the field: a storage option, a secret, or not fingerprinted.

Redaction, the fingerprint and the list of values hidden from logs walk the model's fields and read
these markers (`Annotated` metadata), so a new section with a storage option is redacted, hidden and
left out of the fingerprint without any of those modules naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from pydantic import BaseModel, Field


@dataclass(frozen=True)
class Marker:
    """A property of a field, found by `marked` and `dumped` in the field's `Annotated` metadata."""

    name: str


# Not part of what the job makes: free to change when an output resumes (where files are, how many
# workers run, prices). Left out of JobSpec.fingerprint.
NOT_FINGERPRINTED = Marker("not fingerprinted")
# Shown as "<redacted>" (when set) in the spec a job records and logs.
REDACTED = Marker("redacted")
# fsspec options (credentials, endpoints): redacted, not fingerprinted, and their values hidden from
# every log line and error while a job runs (imagemill.cli.redaction).
STORAGE_OPTION = Marker("storage option")

StorageOptions = Annotated[
    dict[str, Any],
    STORAGE_OPTION,
    REDACTED,
    NOT_FINGERPRINTED,
    Field(
        default_factory=dict,
        repr=False,
        description="fsspec options (credentials, endpoint_url, ...) for this section's URLs; never "
        "logged nor recorded.",
    ),
]
# A value that names who signs or where a key is: in no record, and no part of what the job makes.
Private = Annotated[str, REDACTED, NOT_FINGERPRINTED]
REDACTED_TEXT = "<redacted>"


def has_marker(model: type[BaseModel], name: str, marker: Marker) -> bool:
    return marker in model.model_fields[name].metadata


def marked(model: BaseModel, marker: Marker, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every field carrying `marker`, in `model` and the sections in it
    (sections that are None are skipped; lists of sections are numbered: model.lora.0.source)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if has_marker(type(model), name, marker):
            yield f"{prefix}{name}", value
        else:
            for index, section in _sections_in(value):
                yield from marked(section, marker, f"{prefix}{name}.{index}")


def dumped(model: BaseModel, leave_out: Marker | None = None, hide: Marker | None = None) -> dict[str, Any]:
    """`model_dump()` without the fields marked `leave_out`, and with the set fields marked `hide`
    shown as REDACTED_TEXT; at any depth."""
    data: dict[str, Any] = {}
    for name in type(model).model_fields:
        if leave_out is not None and has_marker(type(model), name, leave_out):
            continue
        value = getattr(model, name)
        if hide is not None and has_marker(type(model), name, hide):
            data[name] = REDACTED_TEXT if value else value
        elif isinstance(value, BaseModel):
            data[name] = dumped(value, leave_out, hide)
        elif isinstance(value, list) and any(isinstance(item, BaseModel) for item in value):
            data[name] = [dumped(item, leave_out, hide) for item in value]
        else:
            data[name] = model.model_dump(include={name})[name]
    return data


def _sections_in(value: Any) -> Iterator[tuple[str, BaseModel]]:
    """The sections a field holds, with the suffix that names each ("" for one, ".<i>" in a list)."""
    if isinstance(value, BaseModel):
        yield "", value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, BaseModel):
                yield f".{index}", item


def is_marked_path(model: type[BaseModel], dotted: str, marker: Marker) -> bool:
    """Whether the setting `dotted` (as `--set` names it: speed.compile_cache_storage_options.key) is
    in a field carrying `marker`, found from the model's classes: no spec needs to exist yet."""
    section: type[BaseModel] | None = model
    for part in dotted.split("."):
        field = section.model_fields.get(part) if section is not None else None
        if field is None:
            return False
        if marker in field.metadata:
            return True
        section = _section_class(field.annotation)
    return False


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (`X`, `X | None`), or None for a plain value or a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_section_class(arg) for arg in get_args(annotation) if arg is not None)), None)
