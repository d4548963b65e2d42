"""The model's hash for the files' "Model hash": what the model directory holds, read once per actor.

sha256 over one line `<relative path>\\t<sha256 of the file>` per file of the directory (configs,
tokenizers, weights), sorted by path: a fine-tune with the same shapes gets another hash, a copy of
the same directory elsewhere (node cache, another bucket) the same one. A file in the hub cache is a
link to `blobs/<its sha256>`, so its hash is read from the name instead of the file; other files are
read once, streamed (about 1 s per GB per actor, before its first shard). The A1111 text shows the first
10 hex digits, as A1111's own "Model hash" does; the JSON has all 64.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_HUB_BLOB = re.compile(r"[0-9a-f]{64}")
CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    target = path.resolve()
    if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return target.name  # the hub names LFS blobs by their sha256
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hash(directory: str | os.PathLike) -> str:
    """The hash of every file under `directory` (hidden files and folders, e.g. `.cache`, left out)."""
    root = Path(directory)
    lines = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            lines.append(f"{relative.as_posix()}\t{file_sha256(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def model_hash(local: str) -> str | None:
    """The hash of a model given as the libraries got it (`Pretrained.local`): a directory, or a hub id
    found in the local hub cache; None when neither is there to read."""
    if Path(local).is_dir():
        return directory_hash(local)
    try:
        from huggingface_hub import snapshot_download

        return directory_hash(snapshot_download(local, local_files_only=True))
    except Exception:  # not in the cache (or not a hub id): the files say no hash rather than a wrong one
        return None
