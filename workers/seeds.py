"""Per-row seeds: a row's image depends only on the model, its parameters and its seed."""

from __future__ import annotations

import hashlib

MAX_SEED = 2**63 - 1  # seeds are stored as int64 in the metadata


def derive_seed(job_seed: int, row_id: str) -> int:
    """A seed from the job seed and the row id alone, so no batch, actor or shard order can change it."""
    digest = hashlib.sha256(f"{job_seed}/{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def expansion_seed(job_seed: int, variant_id: str) -> int:
    """The seed of a prompt expansion: apart from the image seeds, so the two draws are independent."""
    return derive_seed(job_seed, f"expansion/{variant_id}")


def draw_seed(row_seed: int, draw: int) -> int:
    """The seed of a row's `draw`-th image: draw 0 is the row's own seed; later draws (best-of-N
    candidates, safety retries: workers/selection.py) get one derived from (row seed, draw) alone, so
    they are the same on every run and resume whatever else the batch holds."""
    return row_seed if draw == 0 else derive_seed(row_seed, f"draw/{draw}")


STRENGTH_STEP = 0.01  # drawn strengths are multiples of this, so rows drawing the same one batch together


def drawn_strength(row_seed: int, low: float, high: float) -> float:
    """A strength in [low, high] drawn from the row's seed alone (the same on every run), to STRENGTH_STEP."""
    fraction = derive_seed(row_seed, "strength") / MAX_SEED
    drawn = round(round((low + (high - low) * fraction) / STRENGTH_STEP) * STRENGTH_STEP, 10)
    return min(max(drawn, low), high)
