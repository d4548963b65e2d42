"""The job spec: YAML loading, defaults, `--set` overrides, validation messages, paths, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import build_spec, load_spec, parse_overrides

MINIMAL = {
    "input": {"path": "s3://bucket/prompts"},
    "output": {"path": "s3://bucket/out"},
    "model": {"source": "org/some-model"},
}


@pytest.fixture
def spec_file(tmp_path: Path):
    """Writes a YAML spec (MINIMAL unless given) and returns its path."""

    def write(data=MINIMAL, text: str | None = None) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(data))
        return path

    return write


def with_section(section: str, **fields) -> dict:
    return {**MINIMAL, section: {**MINIMAL.get(section, {}), **fields}}


# --- loading and overrides ------------------------------------------------------------------------


def test_minimal_yaml_loads_with_defaults(spec_file):
    spec = load_spec(spec_file())

    assert spec.input.path == "s3://bucket/prompts"
    assert spec.input.prompt_column == "prompt" and spec.input.rows_per_shard == "auto"
    assert spec.output.image_format == "png"
    assert spec.generation.width == spec.generation.height == 512
    assert spec.generation.negative_prompt is None
    assert spec.workers.batch_size == 8


def test_set_overrides_apply_with_yaml_typing(spec_file):
    path = spec_file(with_section("generation", negative_prompt="blurry", guidance_scale=5))
    overrides = parse_overrides(
        [
            "workers.batch_size=16",
            "generation.negative_prompt=null",
            "output.image_format=webp",
            "generation.guidance_scale=3.5",
            "name=nightly",
        ]
    )

    spec = load_spec(path, overrides)

    assert spec.workers.batch_size == 16
    assert spec.generation.negative_prompt is None
    assert spec.output.image_format == "webp"
    assert spec.generation.guidance_scale == 3.5
    assert spec.name == "nightly"


def test_parse_overrides_types_values_as_yaml():
    assert parse_overrides(["a.b=16", "c=true", "d=null", "e=s3://x/y", "f="]) == [
        ("a.b", 16),
        ("c", True),
        ("d", None),
        ("e", "s3://x/y"),
        ("f", ""),
    ]


@pytest.mark.parametrize("pair", ["foo", "=value", ""])
def test_set_without_key_value_is_refused(pair):
    with pytest.raises(ImagemillError, match="key=value"):
        parse_overrides([pair])


def test_set_with_a_value_that_is_not_valid_yaml_is_a_clear_error():
    with pytest.raises(ImagemillError, match="generation.negative_prompt"):
        parse_overrides(["generation.negative_prompt=[blurry"])


def test_overrides_do_not_change_the_callers_dict():
    data = with_section("workers", batch_size=4)

    build_spec(data, [("workers.batch_size", 32)])

    assert data["workers"] == {"batch_size": 4}


def test_nested_overrides_do_not_leak_into_the_next_spec_built_from_the_same_dict():
    base = with_section("input", storage_options={"anon": True})

    first = build_spec(base, [("input.storage_options.endpoint_url", "http://first")])
    second = build_spec(base)

    assert first.input.storage_options == {"anon": True, "endpoint_url": "http://first"}
    assert second.input.storage_options == {"anon": True}


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ([("workers.batch_size", 0)], "workers.batch_size"),
        ([("output.image_format", "gif")], "output.image_format"),
        ([("workers.batchsize", 16)], "workers.batchsize"),
        ([("input.rows_per_shard", -1)], "input.rows_per_shard"),
        ([("output.quality", 101)], "output.quality"),
        ([("generation.width", "wide")], "generation.width"),
        ([("name", "  ")], "name"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ImagemillError, match=rf"{field}\b"):
        build_spec(MINIMAL, overrides)


@pytest.mark.parametrize("section", ["input", "output", "model"])
def test_a_missing_required_section_is_named(section):
    data = {key: value for key, value in MINIMAL.items() if key != section}
    with pytest.raises(ImagemillError, match=section):
        build_spec(data)


def test_override_below_a_plain_value_is_refused():
    with pytest.raises(ImagemillError, match="not a section"):
        build_spec(MINIMAL, [("input.path.deeper", 1)])


def test_missing_spec_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ImagemillError, match=r"not found.*nope\.yaml"):
        load_spec(missing)


@pytest.mark.parametrize("text", ["- a\n- list\n", "just a string\n", ""])
def test_spec_that_is_not_a_mapping_is_refused(spec_file, text):
    with pytest.raises(ImagemillError, match="YAML mapping"):
        load_spec(spec_file(text=text))


def test_spec_that_is_not_yaml_is_refused(spec_file):
    with pytest.raises(ImagemillError, match="not valid YAML"):
        load_spec(spec_file(text="input: {path: [unclosed\n"))


# --- paths and redaction --------------------------------------------------------------------------


def test_relative_local_paths_become_absolute_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    data = {
        "input": {"path": "prompts/part-*.parquet"},
        "output": {"path": "out/"},
        "model": {"source": "./models/tiny"},
    }

    spec = build_spec(data)

    assert spec.input.path == str(tmp_path / "prompts" / "part-*.parquet")
    assert spec.output.path == str(tmp_path / "out")
    assert spec.model.source == str(tmp_path / "models" / "tiny")


def test_urls_and_hub_ids_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {
        "input": {"path": "s3://b/x"},
        "output": {"path": "gs://b/out/"},
        "model": {"source": "org/some-model"},
    }

    spec = build_spec(data)

    assert spec.input.path == "s3://b/x"
    assert spec.output.path == "gs://b/out"
    assert spec.model.source == "org/some-model"


def test_redacted_spec_hides_storage_option_values():
    secret = "very-secret-key-123"
    data = {section: {**fields, "storage_options": {"key": secret}} for section, fields in MINIMAL.items()}

    spec = build_spec(data)
    dumped = json.dumps(spec.redacted())

    assert secret not in dumped
    assert spec.input.storage_options == {"key": secret}  # still usable for the job itself
    assert secret not in repr(spec)


@pytest.mark.parametrize(
    ("model", "speed", "named"),
    [
        ({"kind": "janus", "lora": [{"source": "org/lora"}]}, None, "model.lora"),
        ({"kind": "janus", "quantization": "int8_weight_only"}, None, "model.quantization"),
        ({"kind": "noop", "source": ""}, {"compile": True}, "speed"),
    ],
)
def test_diffusers_only_options_are_refused_for_other_model_kinds(spec_file, model, speed, named):
    data = {**MINIMAL, "model": {**MINIMAL["model"], **model}, **({"speed": speed} if speed else {})}
    with pytest.raises(ImagemillError, match=rf"{named} only apply to model.kind: diffusers, not"):
        load_spec(spec_file(data))
