"""Output names: any row id becomes a safe, unique file name inside its shard's folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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


# Characters that break naive names: separators, dots, wildcards, controls, '~' (the hashed names'
# mark), non-ASCII letters, and upper case (a case-insensitive store folds it).
HOSTILE_CHARACTERS = "ab01AB._-/\\ ~?*:\t\n\x00\x7fé✓ß"
hostile_text = st.text(alphabet=st.sampled_from(HOSTILE_CHARACTERS), max_size=12)
row_ids = st.one_of(
    hostile_text,
    st.text(alphabet=st.sampled_from(HOSTILE_CHARACTERS), min_size=90, max_size=300),  # cut to 80 + hash
    st.text(max_size=40),  # any Unicode a Parquet string may hold
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,127}", fullmatch=True),  # plain, or plain-looking with '..'
    st.builds("/".join, st.lists(st.sampled_from(["..", ".", "", "etc", "a"]), max_size=6)),  # paths
)


def assert_safe_name(row_id: str, name: str) -> None:
    """A name for `row_id` that stays in its folder: safe characters, not a dot folder, and either the
    plain id itself (at most 128 characters) or a hashed name of at most 100."""
    assert SAFE_NAME.fullmatch(name), name
    assert name not in (".", "..")
    assert name == row_id or ("~" in name and len(name) <= 100), name


@pytest.mark.parametrize("row_id", ["row-00001", "abc", "a.b_c-9", "part-000-00000012", "x" * 100, "x" * 128])
def test_plain_ids_are_kept_as_they_are(row_id):
    assert image_name(row_id) == row_id


def test_the_demo_jobs_images_keep_their_names():
    """The demo's ids are plain and lower-case: its images stay where they were."""
    ids = pq.read_table(DEMO_PROMPTS, columns=["id"]).column("id").to_pylist()
    assert len(ids) == 64 and [image_name(row_id) for row_id in ids] == ids


def test_a_hashed_name_is_the_same_in_every_version():
    """Names are recomputed on resume and by `verify`: the hash must not depend on the process or release."""
    assert image_name("../Abc") == "Abc~96f599a0f0cac122"
    assert image_name("../Abc") == image_name("../Abc")


def assert_inside_the_shard_folder(root: str, row_id: str) -> None:
    resolved = os.path.normpath(os.path.join(root, OutputLayout.image_path("shard", row_id, "png")))
    assert os.path.dirname(resolved) == os.path.join(root, "images", "shard")
    assert resolved.endswith(".png")


@pytest.mark.parametrize("row_id", HOSTILE_IDS, ids=repr)
def test_hostile_ids_give_safe_names_inside_their_shard_folder(tmp_path, row_id):
    assert_safe_name(row_id, image_name(row_id))
    assert_inside_the_shard_folder(str(tmp_path), row_id)


@example("x" * 128 + "y")  # one past the plain length: hashed
@example("Abc" + "." * 200)  # cut at 80 characters, dots stripped
@given(st.one_of(row_ids, st.builds(str.__add__, st.sampled_from(HOSTILE_IDS), row_ids)))
def test_any_id_gives_a_safe_name_inside_its_shard_folder(tmp_path_factory, row_id):
    assert_safe_name(row_id, image_name(row_id))
    assert_inside_the_shard_folder(str(tmp_path_factory.getbasetemp()), row_id)


@example(["abc", "Abc", "ABC", "aBc", "row-1", "ROW-1", "Row-1", "a_b", "A_B", "x~y", "X~y", "a_b~0"])
@example(HOSTILE_IDS + ["row-00001", "abc"])
@given(st.lists(row_ids, max_size=20))
def test_distinct_ids_get_names_that_differ_even_after_case_folding(ids):
    """Case-insensitive stores (macOS, some mounts) would put `Abc` and `abc` in one file: the ids, their
    case variants, and ids that spell another id's name all get names distinct after `lower()`."""
    every = set(ids) | {row_id.upper() for row_id in ids} | {row_id.swapcase() for row_id in ids}
    every |= {image_name(row_id) for row_id in list(every)}  # an id that spells another id's name
    names = [image_name(row_id) for row_id in every]
    assert len({name.lower() for name in names}) == len(every)
