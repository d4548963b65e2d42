"""The spec's markers and reference page: one walk per rule finds fields no module names, and
docs/spec.md is what the generator makes from the models now."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field

from imagemill.cli.redaction import storage_option_values
from imagemill.core.spec import JobSpec, PretrainedSection, build_spec, parse_overrides
from imagemill.core.spec.markers import (
    NOT_FINGERPRINTED,
    REDACTED,
    STORAGE_OPTION,
    StorageOptions,
    dumped,
    is_marked_path,
    marked,
)
from imagemill.core.spec.reference import COMMAND, reference
from imagemill.core.spec.sections import _Section

PAGE = Path(__file__).resolve().parent.parent / "docs" / "spec.md"
BASE = {"input": {"path": "/in"}, "output": {"path": "/out"}, "model": {"source": "/m"}}


class _Archive(_Section):
    """A section no walk names: a storage option, a setting a resume may change, one it may not."""

    storage_options: StorageOptions
    retries: Annotated[int, NOT_FINGERPRINTED] = Field(3, description="How often to try.")
    layout: str = Field("flat", description="Decides the bytes.")


class _JobWithArchive(JobSpec):
    archive: _Archive = Field(default_factory=_Archive)


def test_the_committed_reference_page_is_what_the_generator_makes():
    assert PAGE.read_text(encoding="utf-8") == reference(), f"docs/spec.md is stale: run `{COMMAND}`"


def test_the_page_lists_every_field_of_every_section():
    page = reference()
    for name, section in [("", JobSpec), *_every_section()]:
        if name:
            assert f"## `{name}`" in page
        for field in section.model_fields:
            assert f"| `{field}` |" in page, f"{name}.{field}"


def _every_section():
    """Each JobSpec field that is a section (optional or not), with its class: read from the model, so
    a section added to JobSpec is checked without naming it here."""
    for name, field in JobSpec.model_fields.items():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, _Section):
                yield name, candidate


@given(secret=st.text(min_size=4, alphabet=st.characters(categories=("L", "N"))))
def test_a_new_sections_marked_fields_are_walked_without_naming_it(secret):
    """The walks read markers, not section names: a section added to the spec is redacted, hidden from
    logs, read raw from --set, and fingerprinted by its markers alone."""
    spec = _JobWithArchive.model_validate(BASE | {"archive": {"storage_options": {"token": secret}}})
    assert [name for name, _ in marked(spec, STORAGE_OPTION)][-1] == "archive.storage_options"
    assert secret in storage_option_values(spec)
    assert dumped(spec, hide=REDACTED)["archive"]["storage_options"] == "<redacted>"
    assert spec.fingerprint()["archive"] == {"layout": "flat"}
    assert is_marked_path(_JobWithArchive, "archive.storage_options.token", STORAGE_OPTION)
    assert not is_marked_path(_JobWithArchive, "archive.layout", STORAGE_OPTION)


def test_every_pretrained_section_shares_the_base_and_its_markers():
    spec = build_spec(
        BASE
        | {"scoring": {"source": "/clip", "storage_options": {"k": "scoring-secret"}}}
        | {"safety": {"source": "/sc"}, "expansion": {"source": "/lm"}, "evaluation": {"source": "/clip"}}
        | {"upscale": {"source": "/sr"}}
    )
    assert set(spec.pretrained()) == {"model", "scoring", "safety", "expansion", "evaluation", "upscale"}
    for name, section in spec.pretrained().items():
        assert isinstance(section, PretrainedSection)
        assert "storage_options" not in spec.fingerprint()[name]
        assert "safetensors_only" not in spec.fingerprint()[name]
        assert spec.fingerprint()[name]["dtype"] == "float32"
    assert "scoring-secret" in storage_option_values(spec)


def test_every_storage_option_of_the_spec_takes_its_value_as_written_from_set():
    """Each marked field, at whatever depth, is found from the classes (0123 stays text, not 83)."""
    spec = build_spec(
        BASE | {"evaluation": {"source": "/c"}, "output": {"path": "/o", "c2pa": {"cert": "c", "key": "k"}}}
    )
    names = [name for name, _ in marked(spec, STORAGE_OPTION)]
    assert "speed.compile_cache_storage_options" in names and "evaluation.reference_storage_options" in names
    for name in names:
        assert parse_overrides([f"{name}.key=0123"]) == [(f"{name}.key", "0123")]
