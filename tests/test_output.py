"""Output names: any row id becomes a safe, unique file name inside its shard's folder."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagemill.core.layout import OutputLayout, image_name

DEMO_PROMPTS = Path(__file__).parent.parent / "jobs" / "demo_prompts.parquet"

SAFE_NAME = re.compile(r"[A-Za-z0-9._~-]+")

HOSTILE_IDS = [
    "../../etc/passwd",
    "/abs",
    "a/b",
    "a b",
    "tab\t",
    "nul\x00",
    "new\nline",
    "ünïcødé",
    "..",
    ".",
    "",
    "x" * 500,
    "a_b",
    "a?b",
    "a\\b",
    "...",
    "-leading-dash",
    "a..b",
    "C:\\windows",
    "~tilde",
]


def random_ids(count: int, seed: int = 1234) -> list[str]:
    """Short ids from an alphabet rich in separators, dots, controls and non-ASCII letters."""
    rng = random.Random(seed)
    alphabet = "ab01._-/\\ ~?*\t\x00\x7fé✓" + "."
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(count)] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(90, 300))) for _ in range(50)
    ]


def assert_safe_name(name: str) -> None:
    assert SAFE_NAME.fullmatch(name), name
    assert name not in (".", "..") and len(name) <= 100


@pytest.mark.parametrize("row_id", ["row-00001", "abc", "a.b_c-9", "part-000-00000012", "x" * 100])
def test_plain_ids_are_kept_as_they_are(row_id):
    assert image_name(row_id) == row_id


def test_ids_differing_only_by_case_get_names_that_differ_after_case_folding():
    """Case-insensitive stores (macOS, some mounts) would put `Abc` and `abc` in one file."""
    assert image_name("Abc").lower() != image_name("abc").lower()
    ids = {"abc", "Abc", "ABC", "aBc", "row-1", "ROW-1", "Row-1", "a_b", "A_B", "x~y", "X~y"}
    ids |= {row_id.upper() for row_id in random_ids(200)} | set(random_ids(200))
    ids |= {image_name(row_id) for row_id in list(ids)}  # an id that spells another id's name
    assert len({image_name(row_id).lower() for row_id in ids}) == len(ids)
    assert_safe_name(image_name("Abc"))


def test_the_demo_jobs_images_keep_their_names():
    """The demo's ids are plain and lower-case: its images stay where they were."""
    ids = pq.read_table(DEMO_PROMPTS, columns=["id"]).column("id").to_pylist()
    assert len(ids) == 64 and [image_name(row_id) for row_id in ids] == ids


@pytest.mark.parametrize("row_id", HOSTILE_IDS, ids=repr)
def test_hostile_ids_give_safe_names(row_id):
    assert_safe_name(image_name(row_id))


def test_generated_ids_give_safe_names():
    for row_id in random_ids(500):
        assert_safe_name(image_name(row_id))


def test_distinct_ids_give_distinct_names():
    ids = set(HOSTILE_IDS) | set(random_ids(500)) | {"row-00001", "abc", "a_b", "a_b~0"}
    ids |= {image_name(row_id) for row_id in HOSTILE_IDS}  # an id that spells another id's name
    names = {image_name(row_id) for row_id in ids}
    assert len(names) == len(ids)


def test_image_name_is_deterministic():
    assert [image_name(i) for i in HOSTILE_IDS] == [image_name(i) for i in HOSTILE_IDS]


@pytest.mark.parametrize("row_id", HOSTILE_IDS + random_ids(200, seed=7), ids=repr)
def test_image_path_stays_inside_the_shard_folder(tmp_path, row_id):
    root = str(tmp_path)
    shard_folder = os.path.join(root, "images", "shard")

    resolved = os.path.normpath(os.path.join(root, OutputLayout.image_path("shard", row_id, "png")))

    assert os.path.dirname(resolved) == shard_folder
    assert resolved.endswith(".png")
