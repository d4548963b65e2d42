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
from pathlib import Path

from imagemill.core.errors import ImagemillError
from imagemill.core.kinds import KINDS
from imagemill.core.spec import EvaluationSpec, JobSpec, ModelSpec, PretrainedSection
from imagemill.core.storage import filesystem, join

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_COMPLETE = ".imagemill-complete"
HUB_TIMEOUT_SECONDS = 10.0  # asking the hub whether a model id exists, before Ray starts


def _is_url(source: str) -> bool:
    return "://" in source


def _is_hub_id(source: str) -> bool:
    return not _is_url(source) and not os.path.isabs(source) and bool(_HUB_ID.fullmatch(source))


def public_name(source: str) -> str | None:
    """The source's name as published files may give it: a hub id, which names public weights; None
    for a location (a bucket URL, a local directory, relative or not), which says whose they are."""
    return source if _is_hub_id(source) and not os.path.exists(source) else None


def check_sources(spec: JobSpec) -> None:
    """Fail on the driver, before any actor starts, when a section's weights cannot be where the spec
    says: every section that names pretrained weights (JobSpec.pretrained), whichever it is."""
    for name, section in spec.pretrained().items():
        check_source(name, section)


def check_source(name: str, section: PretrainedSection) -> None:
    """The check of one section `name`: its source's directory holds the file its class names
    (`weights_file`); the model's depends on its kind, the Inception-v3 weights are one file, and
    pixel features have none."""
    if isinstance(section, ModelSpec):
        check_model_source(section)
    elif isinstance(section, EvaluationSpec) and section.features == "inception":
        weights_file(section)
    elif section.source is not None:
        _check_source(section.source, section.storage_options, *section.weights_file, section=name)


def check_model_source(spec: ModelSpec) -> None:
    """The model's check: the marker file of its kind (none for a kind without a model), and its LoRAs."""
    kind = KINDS[spec.kind]
    if kind.needs_model:
        check_lora_sources(spec)
        _check_source(spec.source, spec.storage_options, kind.marker, kind.description, section="model")


def _check_source(source: str, storage_options: dict, marker: str, kind: str, section: str) -> None:
    """`section` names the spec section (model, scoring), `marker` the file `kind`'s directory holds."""
    what = "model" if section == "model" else f"{section} model"
    if _is_url(source):
        fs, path = filesystem(source, storage_options)
        if not fs.exists(join(path, marker)):
            raise ImagemillError(
                f"{what} not found: {source} has no {marker}; point {section}.source at {kind} "
                "directory (one that save_pretrained wrote)"
            )
    elif _is_hub_id(source):
        _check_hub_id(source, marker, section, what)
    elif not os.path.isdir(source):
        raise ImagemillError(f"{what} path does not exist: {source} ({section}.source)")
    elif not os.path.isfile(os.path.join(source, marker)):
        raise ImagemillError(f"{what} directory {source} has no {marker}; it must be {kind} directory")


def _check_hub_id(source: str, marker: str, section: str, what: str) -> None:
    """A hub id must be in the local Hugging Face cache or, online, on the hub: else the actors would
    start Ray, load for half a minute and fail with "check the stacktrace above" and no stack trace.
    Offline (HF_HUB_OFFLINE, as huggingface_hub reads it) a cache miss is the error; online the hub is
    asked once, and only its "no such repository" is one (a network error leaves it to the actors)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(source, marker), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES:
        raise ImagemillError(
            f"{what} '{source}' ({section}.source) is a hub id not in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE forbids downloading it: download it first (`hf download "
            f"{source}`), unset HF_HUB_OFFLINE, or point {section}.source at a local directory"
        )
    try:
        HfApi().model_info(source, timeout=HUB_TIMEOUT_SECONDS)
    except RepositoryNotFoundError:
        raise ImagemillError(
            f"{what} '{source}' ({section}.source) is not on the Hugging Face hub: check the id (org/name), "
            "or for a private or gated model set HF_TOKEN"
        ) from None
    except Exception:  # noqa: BLE001 - no answer from the hub: the actors try, and say why
        return


def _cache_root() -> Path:
    return Path(os.environ.get("IMAGEMILL_CACHE_DIR", Path.home() / ".cache" / "imagemill")) / "models"


def fetch_model_dir(url: str, storage_options: dict) -> Path:
    """Copy the directory at `url` to this node's cache once, and return the local copy.

    Only workers/loading.py calls this (tests/test_loading.py holds it to that), for every pretrained
    source: model, LoRA, scoring, expansion and tiny VAE.
    """
    fs, path = filesystem(url, storage_options)
    listing = sorted(
        (info["name"], info.get("size"), str(info.get("ETag") or info.get("mtime") or ""))
        for info in fs.find(path, detail=True).values()
    )
    # Every key is checked before anything is written, so a refused listing leaves no partial copy.
    relative = [_relative_parts(url, path, name) for name, _, _ in listing]
    key = hashlib.sha256(repr((url, listing)).encode()).hexdigest()[:24]
    target = _cache_root() / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other actors on this node wait here for the first one's copy
        if not (target / _COMPLETE).exists():
            staging = Path(f"{target}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            for (name, _, _), parts in zip(listing, relative, strict=True):
                local = staging.joinpath(*parts)
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(name, str(local))
            (staging / _COMPLETE).touch()
            staging.rename(target)
    return target


def _relative_parts(url: str, root: str, name: str) -> tuple[str, ...]:
    """The folder and file names of remote file `name` below `root`.

    Object keys are plain strings: `m/../../x` and `m//etc/x` are valid keys, and joined onto the
    staging folder as they are, the first climbs out of it and the second (an absolute path after the
    `//`) replaces it. A key with an empty, `.` or `..` part is refused; names made only of other
    parts, joined onto the fresh staging folder, stay inside it.
    """
    prefix = root.rstrip("/") + "/"
    parts = tuple(name[len(prefix) :].split("/")) if name.startswith(prefix) else ("",)
    if any(part in ("", ".", "..") for part in parts):
        raise ImagemillError(
            f"model files at {url} include the object {name!r}, whose copy would land outside the local "
            "cache (an empty, '.' or '..' path part); remove or rename that object"
        )
    return parts


def check_lora_sources(spec: ModelSpec) -> None:
    """Fail on the driver when a LoRA named by a local path is not there (URLs and hub ids are
    checked where they are loaded)."""
    for index, lora in enumerate(spec.lora):
        if not _is_url(lora.source) and not _is_hub_id(lora.source) and not os.path.exists(lora.source):
            raise ImagemillError(f"LoRA not found: {lora.source} (model.lora[{index}].source)")


# A folder's Inception-v3 weights file (evaluation.features: inception), preferred in this order.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def weights_file(spec: EvaluationSpec) -> tuple[object, str]:
    """The filesystem and path of the weights file `evaluation.source` names (a file, or the one
    weights file in a folder)."""
    assert spec.source is not None
    fs, path = filesystem(spec.source, spec.storage_options)
    if not fs.exists(path):
        raise ImagemillError(f"evaluation.source {spec.source} does not exist (the Inception-v3 weights)")
    if not fs.isdir(path):
        return fs, path
    names = sorted(name.rpartition("/")[2] for name in fs.ls(path, detail=False))
    for suffix in WEIGHT_SUFFIXES:
        found = [name for name in names if name.endswith(suffix)]
        if len(found) == 1:
            return fs, join(path, found[0])
        if found:
            raise ImagemillError(
                f"evaluation.source {spec.source} holds several {suffix} files ({', '.join(found)}); "
                "point it at the Inception-v3 weights file itself"
            )
    raise ImagemillError(
        f"evaluation.source {spec.source} holds no Inception-v3 weights file "
        f"({' or '.join(WEIGHT_SUFFIXES)}, e.g. weights-inception-2015-12-05-6726825d.pth)"
    )
