"""`imagemill submit`: run a job on a Ray cluster through the Ray Jobs API.

The spec is checked here, resolved (`--set` overrides and the date applied) and written as the one
file of the job's working directory, which `imagemill run` runs there; so its paths are read on the
cluster: use URLs (s3://…) or paths that exist on the cluster's nodes. Settings travel in that file
only, never on the job's command line, which `ray job list`, the dashboard and the job's log all show:
storage options hold credentials. The cluster's Python must have imagemill installed (the image in
infra/ does), or name it in `pip`.
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

from imagemill.errors import ImagemillError
from imagemill.spec import JobSpec, load_spec

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 120  # a head that has just started answers before its job agent is up
JOB_FILE = "job.yaml"  # the resolved spec, in the job's working directory


def submission_id(job_name: str, now: datetime) -> str:
    """`<job name>-<UTC date and time>`: readable in the dashboard, sortable, new for each submission."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", job_name).strip("-") or "imagemill"
    return f"{slug}-{now:%Y%m%d-%H%M%S}"


def entrypoint(spec_name: str = JOB_FILE) -> str:
    """The job's command line: the spec file and nothing else (no --set value, no --date)."""
    return shlex.join(["imagemill", "run", spec_name, "--no-progress"])


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
) -> tuple[str, str | None]:
    """Submit the job; returns (submission id, final state or None when not waiting)."""
    from ray.job_submission import JobSubmissionClient

    from imagemill.spec import parse_overrides

    spec = load_spec(spec_path, parse_overrides(overrides), day=day)  # fail here, not on the cluster
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (
            " (pass the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
            if "token" in reason
            else ""
        )
        raise ImagemillError(f"cannot reach the Ray cluster at {address}: {reason}{hint}") from None
    with tempfile.TemporaryDirectory(prefix="imagemill-submit-") as folder:
        write_job_spec(spec, Path(folder))
        runtime_env: dict[str, Any] = {"working_dir": folder}
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
    if not wait:
        return job_id, None
    asyncio.run(_follow(client, job_id))
    while (state := str(client.get_job_status(job_id)).split(".")[-1]) not in FINAL_STATES:
        time.sleep(1)  # the log stream can end a moment before the state is final
    return job_id, state


def _submit_when_ready(client: Any, address: str, **job: Any) -> str:
    """Submit, waiting out a cluster that has just started and has no job agent up yet."""
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return client.submit_job(**job)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if "try again later" not in reason or time.monotonic() > deadline:
                raise ImagemillError(f"the Ray cluster at {address} refused the job: {reason}") from None
            time.sleep(2)


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
