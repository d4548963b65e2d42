"""`imagemill submit`'s decisions that need no cluster: which local paths travel with a job, which are
refused, and what `status` says of a job submitted but not started."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

import imagemill.cli.job_files
from imagemill.cli.job_files import UPLOADS, is_local_cluster, upload_local_files
from imagemill.cli.submit import mark_submitted
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import OutputLayout
from imagemill.core.spec import build_spec
from imagemill.reporting.status import STATUS_EXIT_CODES

REMOTE = "http://10.0.0.5:8265"


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("http://127.0.0.1:8265", True),
        ("http://localhost:8265", True),
        ("127.0.0.1:8265", True),
        ("http://[::1]:8265", True),
        (REMOTE, False),
        ("http://ray-head:8265", False),
    ],
)
def test_a_cluster_on_this_machine_is_told_by_its_address(address, local):
    assert is_local_cluster(address) is local


def _spec(tmp_path: Path, model: Path, **output):
    prompts = tmp_path / "prompts.parquet"
    prompts.write_bytes(b"PAR1 stand-in")  # only copied, never read here
    return build_spec(
        {
            "input": {"path": str(prompts)},
            "output": {"path": "s3://bucket/out", **output},
            "model": {"source": str(model), "lora": [{"source": "some-org/some-lora"}]},
        }
    )


def test_local_inputs_and_models_are_copied_into_the_working_directory(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.safetensors").write_bytes(b"w" * 1000)
    spec = _spec(tmp_path, model)
    folder = tmp_path / "working_dir"
    upload_local_files(spec, folder, shared=False)
    assert spec.input.path == f"{UPLOADS}/input/prompts.parquet"
    assert spec.model.source == f"{UPLOADS}/model/model"
    assert spec.model.lora[0].source == "some-org/some-lora"  # a hub id stays
    assert (folder / spec.input.path).read_bytes() == b"PAR1 stand-in"
    assert (folder / spec.model.source / "unet" / "weights.safetensors").stat().st_size == 1000

    kept = _spec(tmp_path, model)
    upload_local_files(kept, tmp_path / "unused", shared=True)
    assert kept.input.path == str(tmp_path / "prompts.parquet") and not (tmp_path / "unused").exists()


def test_more_than_the_upload_limit_is_refused_naming_the_fix(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"w" * 5000)
    monkeypatch.setattr(imagemill.cli.job_files, "UPLOAD_LIMIT_BYTES", 4096)
    with pytest.raises(ImagemillError) as refused:
        upload_local_files(_spec(tmp_path, model), tmp_path / "working_dir", shared=False)
    message = str(refused.value)
    assert message.startswith(f"model.source {model}: the local files to send with the job exceed 0 MiB")
    assert "s3://" in message and "--shared-path" in message and "\n" not in message
    assert not (tmp_path / "working_dir").exists()


@pytest.mark.cli
def test_status_of_a_submitted_job_that_has_not_started(tmp_path):
    out = tmp_path / "out"
    mark_submitted(OutputLayout(str(out)), "nightly-20261129-010203", REMOTE, "nightly")
    status = run_cli("status", str(out))
    assert status.returncode == STATUS_EXIT_CODES["submitted, not started"], status.stderr
    line = status.stdout.strip().splitlines()[-1]  # a state, not an error
    assert line.startswith(f"job nightly at {out}: submitted, not started (Ray job ") and not status.stderr
    assert "nightly-20261129-010203" in line and REMOTE in line
    empty = run_cli("status", str(tmp_path / "nothing"))
    assert "no imagemill job found" in empty.stderr
