"""The local paths of a job submitted to a Ray cluster: made to mean the same thing on the cluster.

A spec's local paths (made absolute against the client's directory when it loads) name files on the
client. A job on a cluster runs elsewhere, so `imagemill submit` decides for each one:

- shared: the cluster is on this machine (a loopback address whose head node has one of this
  machine's addresses: not an SSH tunnel's local port), or the user says the paths are shared storage
  mounted at the same place on every node (`--shared-path`): used as they are.
- otherwise a local input or model (scoring, safety and expansion models, LoRAs and the tiny VAE too) is
  copied into the job's working directory, which Ray uploads (its package limit is 512 MiB), and its
  path in the uploaded job.yaml becomes relative to that directory, where the job runs. More than
  UPLOAD_LIMIT_BYTES is refused with the fix.
- a local output is refused: a job would write it on whichever node runs it, out of the user's
  reach, and report success.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec

UPLOAD_LIMIT_BYTES = 400 * 2**20  # under Ray's 512 MiB working_dir package limit, with room for zip overhead
UPLOADS = "uploaded"  # the folder of the copied files, in the job's working directory
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
HEAD_WAIT_SECONDS = 60


def is_local_cluster(address: str) -> bool:
    """Whether the cluster's address is this machine, so that its nodes see this filesystem."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def shares_this_filesystem(address: str) -> bool:
    """Whether the cluster is on this machine: its address is loopback and its head node has one of
    this machine's addresses. Through an SSH tunnel (`ray dashboard`, `kubectl port-forward`) the
    address is loopback but the head is elsewhere."""
    if not is_local_cluster(address):
        return False
    import psutil
    from ray.util.state import list_nodes

    deadline = time.monotonic() + HEAD_WAIT_SECONDS
    heads = []
    while not heads and time.monotonic() < deadline:  # a head that has just started lists no node yet
        try:
            heads = list_nodes(address=address, filters=[("is_head_node", "=", True)])
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ImagemillError(
                f"cannot ask the Ray cluster at {address} for its head node: {reason}"
            ) from None
        if not heads:
            time.sleep(1)
    here = {entry.address for entries in psutil.net_if_addrs().values() for entry in entries}
    return any(head.node_ip in here for head in heads)


def _is_local(path: str | None) -> bool:
    """A local path, as load_spec leaves one: absolute (hub ids and URLs are not)."""
    return bool(path) and Path(path).is_absolute()


def _local_sources(spec: JobSpec) -> Iterator[tuple[str, str, object, str]]:
    """(setting, folder name, the object holding it, attribute) for each local input and model."""
    candidates = [
        ("input.path", "input", spec.input, "path"),
        ("model.source", "model", spec.model, "source"),
    ]
    candidates += [
        (f"model.lora[{i}].source", f"lora-{i}", lora, "source") for i, lora in enumerate(spec.model.lora)
    ]
    if spec.scoring is not None:
        candidates.append(("scoring.source", "scoring", spec.scoring, "source"))
    if spec.expansion is not None:
        candidates.append(("expansion.source", "expansion", spec.expansion, "source"))
    if spec.safety is not None:
        candidates.append(("safety.source", "safety", spec.safety, "source"))
    candidates.append(("speed.tiny_vae", "tiny-vae", spec.speed, "tiny_vae"))
    for setting, folder, holder, attribute in candidates:
        if _is_local(getattr(holder, attribute)):
            yield setting, folder, holder, attribute


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def check_output(spec: JobSpec, address: str, shared: bool) -> None:
    """Refuse a local output the cluster's nodes would not share with the user."""
    if _is_local(spec.output.path) and not shared:
        raise ImagemillError(
            f"output.path {spec.output.path} is a local path: the job on {address} would write it on "
            "the node it runs on; use a URL (s3://...), or pass --shared-path if it is storage "
            "mounted at the same place on every node"
        )


def upload_local_files(spec: JobSpec, folder: Path, shared: bool) -> None:
    """Copy the spec's local inputs and models into `folder` (the job's working directory) and point
    the spec at the copies, relative to it; nothing where the paths are shared with the cluster."""
    if shared:
        return
    sources = list(_local_sources(spec))
    total = 0
    for setting, _, holder, attribute in sources:
        path = Path(getattr(holder, attribute))
        if not path.exists():
            raise ImagemillError(
                f"{setting} {path} is not a file or folder on this machine, so it cannot be sent "
                "to the cluster; name the file or folder itself, or use a URL (s3://...)"
            )
        total += _size(path)
        if total > UPLOAD_LIMIT_BYTES:
            raise ImagemillError(
                f"{setting} {path}: the local files to send with the job exceed "
                f"{UPLOAD_LIMIT_BYTES // 2**20} MiB (Ray's working_dir limit); put them on object "
                "storage (s3://...) and name the URL, or pass --shared-path if they are on storage "
                "mounted at the same place on every node"
            )
    for _, name, holder, attribute in sources:
        path = Path(getattr(holder, attribute))
        relative = Path(UPLOADS) / name / path.name
        if path.is_dir():
            shutil.copytree(path, folder / relative)
        else:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / relative)
        setattr(holder, attribute, relative.as_posix())
