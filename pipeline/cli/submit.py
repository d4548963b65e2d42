"""`imagemill submit`: run a job on a Ray cluster through the Ray Jobs API.

The spec is checked here, resolved (`--set` overrides and the date applied) and written as job.yaml
in the job's working directory, which `imagemill run` runs there. Its local paths are made to mean the
same on the cluster (imagemill.cli.job_files: shared with a cluster on this machine or with --shared-path,
else inputs and models uploaded with the job and a local output refused). Settings travel in that
file only, never on the job's command line, which `ray job list`, the dashboard and the job's log all
show: storage options hold credentials. The cluster's Python must have imagemill installed (the image
in infra/ does), or name it in `pip`. Where the client can write the output, `_submitted.json` there
lets `imagemill status` say the job was submitted before it starts.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from imagemill.cli.job_files import check_output, is_local_cluster, shares_this_filesystem, upload_local_files
from imagemill.core.compile_cache_key import check_compile_cache_key, compile_cache_env
from imagemill.core.errors import ImagemillError
from imagemill.core.layout import SUBMITTED, OutputLayout
from imagemill.core.spec import JobSpec, load_spec
from imagemill.core.write_gate import OwnedOutput

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 120  # a head that has just started answers before its job agent is up
# What a head says while its dashboard and job agent are starting: worth another try.
NOT_READY = ("try again later", "Connection aborted", "RemoteDisconnected", "Connection refused")
JOB_FILE = "job.yaml"  # the resolved spec, in the job's working directory
# The Python that runs the Ray job supervisor (the shell's parent) is the cluster's, the one with Ray
# and imagemill; `python` on the PATH may not be (a cluster started from a virtualenv that is not
# activated). Its interpreter is found from where its Ray is loaded (<prefix>/lib/python3.X/
# site-packages/ray/_raylet.so → <prefix>/bin/python); `python` is the fallback.
CLUSTER_PYTHON = (
    "PY=$(sed -n 's|^.* \\(/[^ ]*\\)/lib/python3[^/]*/[a-z]*-packages/ray/_raylet\\.so$|\\1/bin/python|p'"
    ' /proc/$PPID/maps 2>/dev/null | head -n 1); [ -x "$PY" ] || PY=python; exec "$PY"'
)
AUTH_FIX = (
    "it requires Ray's token authentication: export RAY_AUTH_MODE=token and the cluster's token in "
    "RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH), then submit again"
)


def submission_id(job_name: str, now: datetime) -> str:
    """`<job name>-<UTC date and time>`: readable in the dashboard, sortable, new for each submission."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", job_name).strip("-") or "imagemill"
    return f"{slug}-{now:%Y%m%d-%H%M%S}"


def entrypoint(spec_name: str = JOB_FILE) -> str:
    """The job's command line: the cluster's Python running imagemill on the spec file and nothing
    else (no --set value, no --date)."""
    return f"{CLUSTER_PYTHON} {shlex.join(['-m', 'imagemill.cli', 'run', spec_name, '--no-progress'])}"


def write_job_spec(spec: JobSpec, folder: Path) -> Path:
    """The resolved spec as the YAML file the cluster runs, storage options included (the job needs
    them); the date is already in its name and paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JOB_FILE
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path


def submit(
    spec_path: str,
    address: str,
    overrides: list[str],
    day: date | None = None,
    pip: list[str] | None = None,
    wait: bool = True,
    shared_path: bool = False,
) -> tuple[str, str | None]:
    """Submit the job; returns (submission id, final state or None when not waiting).

    `shared_path`: the spec's local paths are on storage every node mounts at the same place."""
    from ray.job_submission import JobSubmissionClient

    from imagemill.core.spec import parse_overrides

    spec = load_spec(spec_path, parse_overrides(overrides), day=day)  # fail here, not on the cluster
    check_output(spec, address, shared_path or is_local_cluster(address))  # before contacting a cluster
    check_compile_cache_key(spec.speed)
    output = OutputLayout(spec.output.path, spec.output.storage_options)  # before the paths are rewritten
    if is_local_cluster(address):
        _use_local_token()
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if re.search(r"token|auth|401|403", reason, re.IGNORECASE):
            reason = AUTH_FIX  # Ray's own text is a 700-character paragraph
        raise ImagemillError(f"cannot reach the Ray cluster at {address}: {reason}") from None
    shared = shared_path or shares_this_filesystem(address)
    check_output(spec, address, shared)
    with tempfile.TemporaryDirectory(prefix="imagemill-submit-") as folder:
        upload_local_files(spec, Path(folder), shared)
        write_job_spec(spec, Path(folder))
        runtime_env: dict[str, Any] = {"working_dir": folder}
        if env_vars := compile_cache_env(spec.speed):  # the job's driver on the cluster needs the key
            runtime_env["env_vars"] = env_vars
        if pip:
            runtime_env["pip"] = pip
        job_id = _submit_when_ready(
            client,
            address,
            entrypoint=entrypoint(),
            submission_id=submission_id(spec.name, datetime.now(UTC)),
            runtime_env=runtime_env,
            metadata={"imagemill_job": spec.name, "output": spec.output.path},
        )
    mark_submitted(output, job_id, address, spec.name)
    if not wait:
        return job_id, None
    asyncio.run(_follow(client, job_id))
    while (state := str(client.get_job_status(job_id)).split(".")[-1]) not in FINAL_STATES:
        time.sleep(1)  # the log stream can end a moment before the state is final
    return job_id, state


def _use_local_token() -> None:
    """Ray's rule for a cluster on this machine, applied to a loopback address: `ray start --head`
    turns token authentication on and leaves its token in ~/.ray/auth_token, but a client sends it
    only under RAY_AUTH_MODE=token. `ray.init()` enables that when it finds a local cluster and a
    token and RAY_AUTH_MODE is unset (never for an explicit address: a token is not sent elsewhere);
    the same call here lets the cluster guide's `ray start --head && imagemill submit …` work as
    written."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def mark_submitted(output: OutputLayout, job_id: str, address: str, name: str) -> None:
    """`_submitted.json` in the output, for `imagemill status` until the job writes `_job.json`; left
    out where the client cannot write the output (the cluster's nodes may reach what it cannot)."""
    record = {"name": name, "submission_id": job_id, "address": address, "submitted_at": _now()}
    try:
        OwnedOutput.unleased(output).write_json(SUBMITTED, record)  # before the job's run: no lease yet
    except Exception:  # unreachable from here (no credentials, another network): status says less
        return


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _submit_when_ready(client: Any, address: str, **job: Any) -> str:
    """Submit, waiting out a cluster that has just started and has no job agent up yet."""
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return client.submit_job(**job)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if not any(sign in reason for sign in NOT_READY) or time.monotonic() > deadline:
                raise ImagemillError(f"the Ray cluster at {address} refused the job: {reason}") from None
            time.sleep(2)


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
