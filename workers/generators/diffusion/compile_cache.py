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
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

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


def load_compiled(cache: CompileCache, shape: Any, device: str) -> bool:
    """Put the saved compilation for this key into torch's caches; False when there is none yet."""
    fs, root = filesystem(cache.location, cache.storage_options)
    path = join(root, artifact_name(cache.compiled, shape, device))
    try:
        data = retrying(lambda: fs.cat_file(path), f"reading {path}")
    except FileNotFoundError:
        return False
    torch.compiler.load_cache_artifacts(data)
    return True


def save_compiled(cache: CompileCache, shape: Any, device: str) -> None:
    """Write what this process compiled under this key (whole or not at all)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:  # a backend that leaves nothing to keep (eager, aot_eager)
        return
    fs, root = filesystem(cache.location, cache.storage_options)
    fs.makedirs(root, exist_ok=True)
    path = join(root, artifact_name(cache.compiled, shape, device))
    retrying(lambda: write_file_atomically(fs, path, artifacts[0]), f"writing {path}")
    log.info("compiled denoiser saved to %s", path)
