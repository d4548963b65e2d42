"""A model named by a hub id that cannot be had fails on the driver in one line naming `model.source`
and the fix, before Ray starts: offline, an id not in the local Hugging Face cache; online, one the
hub says does not exist (here a local stand-in for the hub, through HF_ENDPOINT)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_cli, write_prompt_files

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.execution.executor import ShardWork


def _no_executor(work: ShardWork) -> None:
    pytest.fail("the job reached its executor (Ray would have started) with a model that is not there")


@pytest.mark.parametrize("offline", ["1", "true", "YES", "on"])
def test_an_uncached_hub_id_offline_fails_before_any_worker(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
    spec = imagemill.build_spec(
        {"name": "hub", "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
         "model": {"source": "no-such-org/no-such-model"}}
    )  # fmt: skip
    with pytest.raises(ImagemillError) as caught:
        imagemill.run(spec, progress=False, executor=_no_executor)
    message = str(caught.value)
    assert "\n" not in message and "'no-such-org/no-such-model' (model.source)" in message
    assert (
        "not in the local Hugging Face cache" in message
        and "hf download no-such-org/no-such-model" in message
    )
    assert not (tmp_path / "out").exists(), "the output was touched before the model was checked"


class _NoRepos(BaseHTTPRequestHandler):
    """The hub's answer for a repository that does not exist."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    def log_message(self, *args) -> None:
        pass


@pytest.mark.cli
def test_a_hub_id_the_hub_does_not_know_fails_in_one_line_without_ray(tmp_path, monkeypatch):
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _NoRepos)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        write_prompt_files(str(tmp_path / "in"), 1, 4, 4)
        args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
        done = run_cli("run", "jobs/demo.yaml", *args, "--model", "no-such-org/no-such-model")
    finally:
        hub.shutdown()
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "imagemill: error: model 'no-such-org/no-such-model' (model.source) is not on the Hugging Face "
        "hub: check the id (org/name), or for a private or gated model set HF_TOKEN\n"
    )
    assert "ray" not in done.stdout.lower() + done.stderr.lower()
