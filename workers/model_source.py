"""Where a model's files come from: a local directory, a Hugging Face hub id, or an fsspec URL.

A URL (s3://bucket/models/x) is copied once per node into a local cache, under a file lock, so that
several actors on one node share one download. The cache key covers the URL and the listing of the
remote files (names, sizes, etags or mtimes): new weights at the same URL make a new copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from imagemill.errors import ImagemillError
from imagemill.spec import ExpansionSpec, ModelSpec
from imagemill.storage import filesystem, join

MODEL_INDEX = "model_index.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_COMPLETE = ".imagemill-complete"


@dataclass(frozen=True)
class ModelKind:
    """What a model directory of one kind must hold, and how to name such a directory in errors."""

    marker: str
    description: str


DIFFUSERS_PIPELINE = ModelKind(MODEL_INDEX, "a diffusers pipeline directory (one that save_pretrained wrote)")
LANGUAGE_MODEL = ModelKind("config.json", "a transformers model directory (one that save_pretrained wrote)")


def _is_url(source: str) -> bool:
    return "://" in source


def _is_hub_id(source: str) -> bool:
    return not _is_url(source) and not os.path.isabs(source) and bool(_HUB_ID.fullmatch(source))


def check_model_source(spec: ModelSpec | ExpansionSpec, kind: ModelKind = DIFFUSERS_PIPELINE) -> None:
    """Fail on the driver, before any actor starts, when the model cannot be where the spec says."""
    if isinstance(spec, ModelSpec) and spec.kind == "noop":
        return
    source, marker = spec.source, kind.marker
    field = "model.source" if isinstance(spec, ModelSpec) else "expansion.source"
    if _is_url(source):
        fs, path = filesystem(source, spec.storage_options)
        if not fs.exists(join(path, marker)):
            raise ImagemillError(
                f"model not found: {source} has no {marker}; point {field} at {kind.description}"
            )
    elif _is_hub_id(source):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(source, marker), str):
                raise ImagemillError(
                    f"model '{source}' is not a local directory and not in the Hugging Face cache, "
                    "and HF_HUB_OFFLINE=1 forbids downloading it"
                )
    elif not os.path.isdir(source):
        raise ImagemillError(f"model path does not exist: {source}")
    elif not os.path.isfile(os.path.join(source, marker)):
        raise ImagemillError(f"model directory {source} has no {marker}; {field} must be {kind.description}")


def _cache_root() -> Path:
    return Path(os.environ.get("IMAGEMILL_CACHE_DIR", Path.home() / ".cache" / "imagemill")) / "models"


def fetch_model_dir(url: str, storage_options: dict) -> Path:
    """Copy the directory at `url` to this node's cache once, and return the local copy."""
    fs, path = filesystem(url, storage_options)
    listing = sorted(
        (info["name"], info.get("size"), str(info.get("ETag") or info.get("mtime") or ""))
        for info in fs.find(path, detail=True).values()
    )
    key = hashlib.sha256(repr((url, listing)).encode()).hexdigest()[:24]
    target = _cache_root() / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other actors on this node wait here for the first one's copy
        if not (target / _COMPLETE).exists():
            staging = Path(f"{target}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            for name, _, _ in listing:
                local = staging / name[len(path.rstrip("/")) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(name, str(local))
            (staging / _COMPLETE).touch()
            staging.rename(target)
    return target


def resolve_model_source(spec: ModelSpec | ExpansionSpec) -> str:
    """What `from_pretrained` is given on this node: a local directory or a hub id."""
    if _is_url(spec.source):
        return str(fetch_model_dir(spec.source, spec.storage_options))
    return spec.source
