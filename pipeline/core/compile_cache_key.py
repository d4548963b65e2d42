"""The key that signs `speed.compile_cache` artifacts, shared by the driver (which refuses a compile
cache without it and hands it to the actors) and the actors (which sign and check with it).

torch's portable compile cache is not data: loading it writes files where its entries say and, where
Triton is usable, unpickles them, so whoever can write the cache location could run code in every
actor. The cache is therefore trusted only as far as `safetensors_only` trusts weights: an actor
loads an artifact only when its HMAC-SHA256 under this key matches (compile_cache.py). The key is a
secret of the user's, read from the environment (never from the spec, so it is in no job file,
record or log); with none set a compile cache is refused. The driver passes it to its actors as a
Ray runtime_env variable, since on a cluster they do not share the driver's environment.
"""

from __future__ import annotations

import os

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import SpeedSpec

KEY_VARIABLE = "IMAGEMILL_COMPILE_CACHE_KEY"
# Shorter keys could be guessed; `openssl rand -hex 16` gives this many characters.
MIN_KEY_CHARS = 32


def compile_cache_key() -> bytes:
    """The signing key from the environment; one line naming the variable when it is unset or short."""
    value = os.environ.get(KEY_VARIABLE, "")
    if len(value) < MIN_KEY_CHARS:
        problem = "is not set" if not value else f"is shorter than {MIN_KEY_CHARS} characters"
        raise ImagemillError(
            f"speed.compile_cache: {KEY_VARIABLE} {problem}; compiled code is loaded only when signed "
            f"with that secret: export {KEY_VARIABLE}=$(openssl rand -hex 32) where the job starts, "
            "or unset compile_cache"
        )
    return value.encode()


def check_compile_cache_key(speed: SpeedSpec) -> None:
    """The driver's check, before the job starts: a compile cache needs the key."""
    if speed.compile_cache:
        compile_cache_key()


def compile_cache_env(speed: SpeedSpec) -> dict[str, str]:
    """The environment variables actors need for the compile cache (Ray runtime_env `env_vars`): the
    key from this process's environment; none without a compile cache."""
    return {KEY_VARIABLE: compile_cache_key().decode()} if speed.compile_cache else {}


def key_values() -> list[str]:
    """The key as set in this process's environment, for the driver to hide from what it prints
    (imagemill.cli.redaction: a Ray error about an actor's runtime_env may quote it); [] when unset."""
    return [value] if (value := os.environ.get(KEY_VARIABLE)) else []
