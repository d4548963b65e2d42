"""A job spec from YAML and `--set key=value` overrides: the one way a spec is read.

Overrides are applied, `{date}` filled and local paths made absolute here, before and after pydantic
validates the sections (imagemill.core.spec.job)."""

from __future__ import annotations

import copy
import os
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagemill.core.errors import ImagemillError
from imagemill.core.spec.job import JobSpec
from imagemill.core.spec.markers import STORAGE_OPTION, is_marked_path

DATE_FIELD = "{date}"


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    """Relative local paths are resolved against the driver's working directory: actors run elsewhere."""
    return path if _is_url(path) else str(Path(path).expanduser().resolve())


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ImagemillError(f"--set {key}: '{part}' is not a section of the job spec")
        node = child
    node[parts[-1]] = value


class _OverrideLoader(yaml.SafeLoader):
    """YAML for `--set` values whose plain scalars are JSON's: true, false, null and decimal numbers.

    YAML 1.1 (yaml.safe_load) reads 0123 as 83, on/yes/no as booleans and .nan as a float; a setting
    given on the command line must not change like that, so here those stay text. Quotes, flow
    mappings and lists, and explicit tags (!!int 0123) still work as YAML."""


_OverrideLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", r"true|false", "tf"),
    ("null", r"null|~", "n~"),
    ("int", r"-?(?:0|[1-9][0-9]*)", "-0123456789"),
    ("float", r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", "-0123456789"),
):
    _OverrideLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern})$"), list(_first)
    )
# A storage option's value is read as written, except when it starts as YAML that asks for a type.
_TYPED_YAML = ("!!", "'", '"', "{", "[")


def _override_value(key: str, raw: str, storage_option: bool) -> Any:
    """The value of one `key=raw`: a storage option's text as written (credentials are text: 0123 must
    not become 83), anything else as YAML with JSON's scalars (see _OverrideLoader)."""
    if storage_option and not raw.startswith(_TYPED_YAML):
        return raw
    if not raw:
        return ""
    try:
        return yaml.load(raw, Loader=_OverrideLoader)  # a SafeLoader: no Python objects
    except (yaml.YAMLError, ValueError):  # ValueError: a tag the text does not fit (!!int abc)
        shown = "its value" if storage_option else f"'{raw}'"  # a storage option's value is never shown
        raise ImagemillError(
            f"--set {key}: {shown} is not a valid YAML value; quote it to pass it as a string"
        ) from None


def parse_overrides(pairs: list[str], storage_options: bool = False) -> list[tuple[str, Any]]:
    """`key.sub=value` strings. Values are YAML with JSON's scalars: 16, 3.5, true, null, "quoted",
    [a, b], {k: v}; other text is a string. Under a `storage_options` key (or every pair, with
    `storage_options`) the value is the text as written, unless it starts with a quote, `{`, `[` or a
    tag (!!bool true); such values never appear in an error message."""
    overrides = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        storage_option = storage_options or is_marked_path(JobSpec, key, STORAGE_OPTION)
        if not sep or not key:
            shown = "a storage option" if storage_option else f"'{pair}'"
            raise ImagemillError(f"--set expects key=value (e.g. workers.batch_size=16), got {shown}")
        overrides.append((key, _override_value(key, raw, storage_option)))
    return overrides


def _fill_date(data: dict[str, Any], day: date) -> None:
    """Replace `{date}` in the job name and the input and output paths: one spec serves every night."""
    text = day.isoformat()
    if isinstance(data.get("name"), str):
        data["name"] = data["name"].replace(DATE_FIELD, text)
    for section in ("input", "output"):
        if isinstance(data.get(section), dict) and isinstance(data[section].get("path"), str):
            data[section]["path"] = data[section]["path"].replace(DATE_FIELD, text)


def build_spec(
    data: dict[str, Any],
    overrides: list[tuple[str, Any]] = (),
    origin: str = "job spec",
    day: date | None = None,
) -> JobSpec:
    """Validate a spec dict after applying overrides and the date, and make local paths absolute.

    `day` fills `{date}` (YYYY-MM-DD) in the name and paths; it defaults to today in UTC.
    """
    data = copy.deepcopy(data)  # overrides must not write into the caller's dicts
    for key, value in overrides:
        _set_dotted(data, key, value)
    _fill_date(data, day or datetime.now(UTC).date())
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        set_keys = {key: f"--set {key}" for key, _ in overrides}
        raise ImagemillError.invalid(origin, exc, JobSpec, set_keys) from None
    spec.input.path = _absolute(spec.input.path).rstrip("/")
    spec.output.path = _absolute(spec.output.path).rstrip("/")
    for section in spec.pretrained().values():
        if section.source and _looks_like_local_path(section.source):
            section.source = _absolute(section.source)
    for lora in spec.model.lora:
        if _looks_like_local_path(lora.source):
            lora.source = _absolute(lora.source)
    if spec.output.c2pa is not None:  # read by the actors, which may run elsewhere
        c2pa = spec.output.c2pa
        c2pa.cert, c2pa.key = (path if _is_url(path) else _absolute(path) for path in (c2pa.cert, c2pa.key))
    reference = spec.evaluation.reference if spec.evaluation is not None else None
    if reference and _looks_like_local_path(reference):
        spec.evaluation.reference = _absolute(reference)
    if spec.speed.tiny_vae and _looks_like_local_path(spec.speed.tiny_vae):
        spec.speed.tiny_vae = _absolute(spec.speed.tiny_vae)
    if spec.speed.compile_cache:  # read and written by the actors
        spec.speed.compile_cache = _absolute(spec.speed.compile_cache)
    return spec


def read_yaml_mapping(path: str | os.PathLike, what: str, holding: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a job spec, a recipe); any problem is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ImagemillError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ImagemillError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ImagemillError(f"{what} {path} must be a YAML mapping with {holding}")
    return data


def load_spec(
    path: str | os.PathLike, overrides: list[tuple[str, Any]] = (), day: date | None = None
) -> JobSpec:
    data = read_yaml_mapping(path, "job spec", "input, output and model sections")
    return build_spec(data, overrides, origin=f"job spec {path}", day=day)
