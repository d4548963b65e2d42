"""Bad settings are stopped up front, a job that made nothing is not a success, numbers stay finite,
and storage-option values (secrets) never leave the job: issue #13 points 7, 8 and 10."""

from __future__ import annotations

import json
import math
import re
import shlex

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli

from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout
from imagemill.core.shard import Shard
from imagemill.core.spec import GenerationSpec, InputSpec, build_spec, load_spec, parse_overrides
from imagemill.core.write_gate import OwnedOutput
from imagemill.reporting.status import STATUS_EXIT_CODES
from imagemill.workers.rows import prepare_rows

SECRET = "s3cr3t-Value-0123"
MINIMAL = {
    "input": {"path": "s3://bucket/prompts"},
    "output": {"path": "s3://bucket/out"},
    "model": {"source": "org/some-model"},
}


def _job(tmp_path, generation: str = "{width: 16, height: 16}", ids: int = 2) -> str:
    table = pa.table({"id": [f"r{i}" for i in range(ids)], "prompt": ["a cat"] * ids})
    pq.write_table(table, tmp_path / "prompts.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts.parquet'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{kind: noop}}\ngeneration: {generation}\nworkers: {{num_workers: 1}}\n"
    )
    return str(job)


def _row_error(column: str, value) -> str | None:
    table = pa.table({"prompt": ["a cat"], column: [value]})
    shard = Shard("f-rg00000-00001", "file:///f.parquet", "f", 0, 1, 0, 1)
    (row,) = prepare_rows(table, shard, InputSpec(path="/data"), GenerationSpec(width=64, height=64))
    return row.error


# --- points 7 and 8: job defaults checked with the per-row rules, at spec load ----------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("width", 30, "width must be a multiple of 8 in 8..4096, got 30"),
        ("height", 4104, "height must be a multiple of 8 in 8..4096, got 4104"),
        ("num_inference_steps", 0, "num_inference_steps must be in 1..1000, got 0"),
        ("num_inference_steps", 1001, "num_inference_steps must be in 1..1000, got 1001"),
        ("guidance_scale", 1e308, "guidance_scale must be a number in 0..100, got 1e+308"),
        ("guidance_scale", -1.0, "guidance_scale must be a number in 0..100, got -1.0"),
        ("guidance_scale", math.nan, "guidance_scale must be a number in 0..100, got nan"),
        ("guidance_scale", math.inf, "guidance_scale must be a number in 0..100, got inf"),
    ],
)
def test_a_bad_generation_default_is_refused_with_the_rule_a_row_gets(field, value, says):
    with pytest.raises(ImagemillError, match=rf"generation\.{field}\b.*{re.escape(says)}") as refused:
        build_spec(MINIMAL, [(f"generation.{field}", value)])
    assert "\n" not in str(refused.value)
    assert _row_error(field, value) == f"invalid_parameter: {says}", "one rule for job defaults and rows"


def test_a_row_with_huge_or_boolean_guidance_is_an_invalid_parameter():
    assert _row_error("guidance_scale", 1e308).startswith("invalid_parameter: guidance_scale")
    assert _row_error("guidance_scale", True).startswith("invalid_parameter: guidance_scale")
    assert _row_error("guidance_scale", 100.0) is None and _row_error("guidance_scale", 0) is None


@pytest.mark.cli
def test_cli_refuses_a_bad_default_in_one_line_before_running(tmp_path):
    for setting in (
        "generation.width=30",
        "generation.guidance_scale=.nan",
        "generation.guidance_scale=1e308",
    ):
        done = run_cli("run", _job(tmp_path), "--set", setting, "--no-progress")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("imagemill: error: "), done.stderr
        assert setting.split("=")[0] in lines[0]
        assert not (tmp_path / "out").exists(), "nothing was started"


def test_no_float_setting_takes_nan_or_infinity():
    scored = {**MINIMAL, "scoring": {"source": "org/clip"}}
    with pytest.raises(ImagemillError, match=r"scoring\.threshold"):
        build_spec(scored, [("scoring.threshold", math.nan)])
    lora = {**MINIMAL, "model": {"source": "m", "lora": [{"source": "l", "scale": math.inf}]}}
    with pytest.raises(ImagemillError, match=r"model\.lora\.0\.scale"):
        build_spec(lora)


def test_records_are_standard_json(tmp_path):
    output = OutputLayout(str(tmp_path / "out"))
    with pytest.raises(ValueError):
        OwnedOutput.unleased(output).write_json("x.json", {"value": math.nan})


def test_a_job_where_every_row_failed_is_not_a_success(ray_address, tmp_path):
    job = _job(tmp_path)
    data = pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"], "width": [30, 30]})
    pq.write_table(data, tmp_path / "prompts.parquet")  # every row asks for a size that is refused

    done = run_cli("run", job, "--no-progress", ray_address=ray_address)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 rows: 0 ok, 2 error" in done.stdout and "no row generated" in done.stdout
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "_job.json").read_text())["status"] == "failed: no row generated"
    status = run_cli("status", str(out))
    assert status.returncode == STATUS_EXIT_CODES["failed: no row generated"], status.stdout
    assert "failed: no row generated" in status.stdout


# --- point 10: --set values and secrets --------------------------------------------------------------


def test_storage_option_values_are_strings_as_written():
    assert parse_overrides(
        [
            f"input.storage_options.key={SECRET}",
            "input.storage_options.token=0123",
            "output.storage_options.secret=on",
            "model.storage_options.anon=!!bool true",
            "model.storage_options.quoted='yes'",
        ]
    ) == [
        ("input.storage_options.key", SECRET),
        ("input.storage_options.token", "0123"),
        ("output.storage_options.secret", "on"),
        ("model.storage_options.anon", True),
        ("model.storage_options.quoted", "yes"),
    ]


def test_set_values_are_not_read_as_yaml_1_1_surprises():
    values = dict(
        parse_overrides(["a=0123", "b=on", "c=yes", "d=.nan", "e=16", "f=3.5", "g=false", "h=null"])
    )
    assert values == {
        "a": "0123",
        "b": "on",
        "c": "yes",
        "d": ".nan",
        "e": 16,
        "f": 3.5,
        "g": False,
        "h": None,
    }


@pytest.mark.parametrize(
    "pair",
    [
        "workers.batch_size=true",
        "generation.seed=0123",
        "model.safetensors_only=on",
        "workers.batch_size=8.0",
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(pair):
    key = pair.split("=")[0]
    with pytest.raises(ImagemillError, match=rf"{key}\b"):
        build_spec(MINIMAL, parse_overrides([pair]))


@pytest.mark.parametrize(
    "pair",
    [
        f"input.storage_options.key='{SECRET}",  # an unclosed quote
        f"input.storage_options={{key: [{SECRET}}}",  # a broken mapping
        f"output.storage_options={SECRET}",  # not a mapping at all
        f"model.storage_options.key=!!int {SECRET}",  # a tag its value does not fit
    ],
)
@pytest.mark.cli
def test_errors_about_storage_options_never_show_their_values(pair, tmp_path):
    with pytest.raises(ImagemillError) as refused:
        build_spec(MINIMAL, parse_overrides([pair]))
    assert "storage_options" in str(refused.value) and SECRET not in str(refused.value)
    done = run_cli("run", _job(tmp_path), "--set", pair)
    assert done.returncode == 2 and SECRET not in done.stdout + done.stderr, done.stderr


@pytest.mark.cli
def test_a_storage_error_that_names_an_option_value_shows_it_redacted(tmp_path):
    """botocore says 'Invalid endpoint: <value>'; what the user sees has the value hidden."""
    done = run_cli("run", _job(tmp_path), "--input", "s3://bucket/p.parquet",
                   "--set", f"input.storage_options.endpoint_url={SECRET}")  # fmt: skip
    assert done.returncode != 0 and "Invalid endpoint" in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr

    status = run_cli("status", "s3://bucket/out", "--storage-option", f"endpoint_url={SECRET}")
    assert status.returncode != 0 and "Invalid endpoint" in status.stderr, status.stderr
    assert SECRET not in status.stdout + status.stderr


def test_a_submitted_job_carries_its_settings_in_a_file_not_on_its_command_line(tmp_path):
    from imagemill.cli.submit import entrypoint, write_job_spec

    job = _job(tmp_path)
    overrides = [f"input.storage_options.key={SECRET}", "workers.batch_size=2"]
    spec = load_spec(job, parse_overrides(overrides))

    command = entrypoint("job.yaml")
    written = write_job_spec(spec, tmp_path / "workdir")

    assert SECRET not in command and "--set" not in command and "--date" not in command
    assert shlex.split(command)[-5:] == ["-m", "imagemill.cli", "run", "job.yaml", "--no-progress"]
    resolved = load_spec(written)
    assert resolved.input.storage_options == {"key": SECRET} and resolved.workers.batch_size == 2
    assert resolved.fingerprint() == spec.fingerprint()
    assert yaml.safe_load(written.read_text())["name"] == spec.name


def test_log_lines_made_while_a_job_runs_hide_storage_option_values(caplog):
    import logging

    from imagemill.cli.redaction import hiding

    log = logging.getLogger("imagemill.core.storage")
    with hiding([SECRET]):
        log.warning("reading %s failed", f"http://{SECRET}/x")
    log.warning("after the job: %s", "shown")
    assert caplog.messages == ["reading http://<redacted>/x failed", "after the job: shown"]


def test_every_sections_storage_option_values_are_hidden_from_messages():
    """The values come from a walk over the spec: every section's storage options, the compile cache's
    and the evaluation reference's included, with no list of sections to keep up to date."""
    from imagemill.cli.redaction import storage_option_values

    places = {
        "input": {"storage_options": {"key": SECRET + "-input"}},
        "output": {"storage_options": {"client_kwargs": {"endpoint_url": SECRET + "-output"}}},
        "model": {"storage_options": {"token": SECRET + "-model"}},
        "scoring": {"source": "org/clip", "storage_options": {"key": SECRET + "-scoring"}},
        "speed": {
            "compile": True,
            "compile_cache": "s3://bucket/cache",
            "compile_cache_storage_options": {"key": SECRET + "-speed"},
        },
    }
    spec = build_spec({name: MINIMAL.get(name, {}) | section for name, section in places.items()})
    values = storage_option_values(spec)
    assert {f"{SECRET}-{name}" for name in places} <= set(values)
