"""`imagemill submit`: run a job on a Ray cluster through the Ray Jobs API.

The spec is checked here, then sent as the job's working directory and run there by `imagemill run`,
so its paths are read on the cluster: use URLs (s3://…) or paths that exist on the cluster's nodes.
The cluster's Python must have imagemill installed (the image in infra/ does), or name it in `pip`.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from imagemill.errors import ImagemillError
from imagemill.spec import load_spec

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 120  # a head that has just started answers before its job agent is up


def submission_id(job_name: str, now: datetime) -> str:
    """`<job name>-<UTC date and time>`: readable in the dashboard, sortable, new for each submission."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", job_name).strip("-") or "imagemill"
    return f"{slug}-{now:%Y%m%d-%H%M%S}"


def entrypoint(spec_name: str, overrides: list[str], day: date | None) -> str:
    command = ["imagemill", "run", spec_name, "--no-progress"]
    for pair in overrides:
        command += ["--set", pair]
    if day is not None:
        command += ["--date", day.isoformat()]
    return shlex.join(command)


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
        shutil.copy(spec_path, Path(folder) / "job.yaml")
        runtime_env: dict[str, Any] = {"working_dir": folder}
        if pip:
            runtime_env["pip"] = pip
        job_id = _submit_when_ready(
            client,
            address,
            entrypoint=entrypoint("job.yaml", overrides, day),
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
