"""`speed.compile_cache`: the compiled denoiser kept in a folder or bucket, so an actor that joins
later loads what the first one compiled instead of spending its first minute compiling.

After the load-time warm-up batch compiles the denoiser (speed.py), torch's portable cache of that
compilation (`torch.compiler.save_cache_artifacts`: Inductor's FX graphs and kernels, AOTAutograd's
entries) is written under a name that is a hash of everything that decides the compiled code: what
is compiled (model, dtype, quantisation, LoRAs, scheduler, speed options, batch size, width, height,
guidance on or off), the torch version and the device (type and name, e.g. the GPU model or the CPU).
A different torch, device or shape is another name, so it never loads a wrong artifact: it misses,
compiles, and saves its own. An actor loads the file (`load_cache_artifacts`) before its warm-up,
which then finds the compiled code in torch's caches instead of compiling. Only the warm-up's shape
is saved: other sizes in a job compile as before. The location changes how fast an actor starts,
never the output, so it is not in the job's fingerprint.

Loading an artifact is running code (torch writes its entries where their keys say and, with Triton,
unpickles them), so each file is signed: its first line is the HMAC-SHA256, under the user's key
(imagemill.core.compile_cache_key), of its name and the artifact, and one whose signature does not
match (tampered, written by someone without the key, or moved from another name) is never handed to
torch: one warning line, the actor compiles from scratch and overwrites it with a signed file. The
signature and the artifact are one file, written whole or not at all, so no reader pairs a new
artifact with an old signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from imagemill.core.compile_cache_key import KEY_VARIABLE, compile_cache_key
from imagemill.core.storage import filesystem, join, retrying, write_file_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileCache:
    location: str  # folder or URL
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    compiled: str = ""  # JSON of what is compiled, from the spec (SpeedOptions.from_spec)


def device_name(device: str) -> str:
    """What the compiled kernels were built for: the GPU model, else the CPU's."""
    kind = torch.device(device).type
    if kind == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{kind}:{platform.machine()}:{platform.processor() or 'cpu'}"


def artifact_name(compiled: str, shape: Any, device: str) -> str:
    """The file name for `compiled` at batch shape `shape` on `device` under this torch."""
    key = {
        "compiled": compiled,
        "shape": [shape.width, shape.height, shape.guidance_scale > 1],
        "torch": torch.__version__,
        "device": device_name(device),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"inductor-{digest[:40]}.bin"


def _signature(key: bytes, name: str, artifact: bytes) -> bytes:
    """HMAC-SHA256 (hex) of the file name and the artifact: a signed artifact verifies under its own
    name only, so one cannot be moved to a key (torch, device, shape) it was not compiled for."""
    return hmac.new(key, name.encode() + b"\0" + artifact, hashlib.sha256).hexdigest().encode()


def signed(key: bytes, name: str, artifact: bytes) -> bytes:
    """The cache file's bytes: the signature on the first line, then the artifact."""
    return _signature(key, name, artifact) + b"\n" + artifact


def verified(key: bytes, name: str, data: bytes) -> bytes | None:
    """The artifact of a cache file whose signature matches; None for any other file."""
    signature, _, artifact = data.partition(b"\n")
    return artifact if hmac.compare_digest(signature, _signature(key, name, artifact)) else None


def load_compiled(cache: CompileCache, shape: Any, device: str) -> bool:
    """Put the saved compilation for this key into torch's caches; False when there is none yet, or
    when the file there is not signed with the job's key (then compiled and saved again)."""
    key = compile_cache_key()
    fs, root = filesystem(cache.location, cache.storage_options)
    name = artifact_name(cache.compiled, shape, device)
    path = join(root, name)
    try:
        data = retrying(lambda: fs.cat_file(path), f"reading {path}")
    except FileNotFoundError:
        return False
    artifact = verified(key, name, data)
    if artifact is None:
        log.warning(
            "compile cache: %s is not signed with %s (tampered, or written without that key): "
            "not loaded, compiling from scratch and replacing it",
            path,
            KEY_VARIABLE,
        )
        return False
    torch.compiler.load_cache_artifacts(artifact)
    return True


def save_compiled(cache: CompileCache, shape: Any, device: str) -> None:
    """Write what this process compiled under this key, signed (whole or not at all)."""
    key = compile_cache_key()
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:  # a backend that leaves nothing to keep (eager, aot_eager)
        return
    fs, root = filesystem(cache.location, cache.storage_options)
    fs.makedirs(root, exist_ok=True)
    name = artifact_name(cache.compiled, shape, device)
    path = join(root, name)
    data = signed(key, name, artifacts[0])
    retrying(lambda: write_file_atomically(fs, path, data), f"writing {path}")
    log.info("compiled denoiser saved to %s", path)
