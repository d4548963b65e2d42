"""A shard's rows: per-row validation, defaults, derived ids and seeds, and batching."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest

from imagemill.core.shard import Shard
from imagemill.core.spec import GenerationSpec, InputSpec
from imagemill.workers.rows import BatchKey, make_batches, prepare_rows
from imagemill.workers.seeds import MAX_SEED, derive_seed

DEFAULTS = GenerationSpec(
    width=64, height=32, num_inference_steps=4, guidance_scale=5.0, negative_prompt="blurry", seed=42
)


def make_shard(num_rows: int, first_row: int = 0, file_key: str = "part-000") -> Shard:
    return Shard(
        shard_id=f"{file_key}-rg00000-00001",
        file_url=f"file:///data/{file_key}.parquet",
        file_key=file_key,
        row_group_start=0,
        row_group_end=1,
        first_row=first_row,
        num_rows=num_rows,
    )


def rows_of(columns: dict, first_row: int = 0, defaults: GenerationSpec = DEFAULTS, **input_fields):
    table = pa.table(columns)
    shard = make_shard(table.num_rows, first_row)
    return prepare_rows(table, shard, InputSpec(path="/data", **input_fields), defaults)


def prompts(n: int) -> list[str]:
    return [f"a cat number {i}" for i in range(n)]


def reason(row) -> str | None:
    return row.error.split(":", 1)[0] if row.error else None


# --- per-row validation ---------------------------------------------------------------------------

BAD_VALUES = [
    ("prompt", None, "invalid_prompt"),
    ("prompt", "", "invalid_prompt"),
    ("prompt", "   \t\n", "invalid_prompt"),
    ("num_inference_steps", 0, "invalid_parameter"),
    ("num_inference_steps", -1, "invalid_parameter"),
    ("width", 100, "invalid_parameter"),
    ("width", 100_000, "invalid_parameter"),
    ("height", 0, "invalid_parameter"),
    ("guidance_scale", math.nan, "invalid_parameter"),
    ("guidance_scale", math.inf, "invalid_parameter"),
    ("seed", -1, "invalid_parameter"),
]


GOOD = dict(prompt="a cat", num_inference_steps=4, width=64, height=64, guidance_scale=5.0, seed=7)


@pytest.mark.parametrize(("column", "bad", "expected"), BAD_VALUES, ids=repr)
def test_a_bad_value_makes_only_its_row_an_error(column, bad, expected):
    """Row 1 of 3 gets the bad value; rows 0 and 2 have a good value in the same column."""
    rows = rows_of({"prompt": ["a cat"] * 3, column: [GOOD[column], bad, GOOD[column]]})

    assert [reason(row) for row in rows] == [None, expected, None]
    assert column in rows[1].error or column == "prompt"


def test_a_non_string_prompt_is_an_error():
    rows = rows_of({"prompt": [1, 2]})

    assert all(reason(row) == "invalid_prompt" and "not a string" in row.error for row in rows)


def test_a_repeated_id_is_a_duplicate_and_its_first_row_is_kept():
    rows = rows_of({"id": ["a", "b", "a", "a"], "prompt": prompts(4)})

    assert [reason(row) for row in rows] == [None, None, "duplicate_id", "duplicate_id"]
    assert "'a'" in rows[2].error


def test_error_messages_name_the_parameter_and_the_value():
    rows = rows_of({"prompt": prompts(2), "width": [100, 64], "num_inference_steps": [4, 0]})

    assert "width" in rows[0].error and "100" in rows[0].error
    assert "num_inference_steps" in rows[1].error and "0" in rows[1].error


# --- defaults and ids -----------------------------------------------------------------------------


def test_rows_without_parameter_columns_use_the_job_defaults():
    (row,) = rows_of({"prompt": ["a cat"]})

    assert row.error is None
    assert (row.width, row.height, row.num_inference_steps, row.guidance_scale) == (64, 32, 4, 5.0)
    assert row.negative_prompt == "blurry"
    assert row.seed == derive_seed(42, row.row_id)


def test_row_columns_override_the_defaults_and_nulls_fall_back_to_them():
    rows = rows_of(
        {
            "prompt": ["a cat", "a dog"],
            "width": [128, None],
            "height": [256, None],
            "num_inference_steps": [10, None],
            "guidance_scale": [1.5, None],
            "negative_prompt": ["ugly", None],
            "seed": [123, None],
        }
    )

    given, fallback = rows
    assert (given.width, given.height, given.num_inference_steps, given.guidance_scale) == (128, 256, 10, 1.5)
    assert (given.negative_prompt, given.seed) == ("ugly", 123)
    assert (fallback.width, fallback.height, fallback.num_inference_steps) == (64, 32, 4)
    assert (fallback.guidance_scale, fallback.negative_prompt) == (5.0, "blurry")
    assert fallback.seed == derive_seed(42, fallback.row_id)
    assert given.error is None and fallback.error is None


def test_ids_come_from_the_id_column():
    rows = rows_of({"id": ["x-1", "y", "z"], "prompt": prompts(3)})

    assert [row.row_id for row in rows] == ["x-1", "y", "z"]


def test_integer_ids_become_strings():
    rows = rows_of({"id": [7, 8], "prompt": prompts(2)})

    assert [row.row_id for row in rows] == ["7", "8"]


def test_ids_fall_back_to_file_key_and_input_row_counted_from_first_row():
    rows = rows_of({"prompt": prompts(3)}, first_row=1000)

    assert [row.input_row for row in rows] == [1000, 1001, 1002]
    assert [row.index for row in rows] == [0, 1, 2]
    assert [row.row_id for row in rows] == ["part-000-00001000", "part-000-00001001", "part-000-00001002"]


def test_null_ids_fall_back_to_derived_ids():
    rows = rows_of({"id": ["given", None], "prompt": prompts(2)}, first_row=5)

    assert [row.row_id for row in rows] == ["given", "part-000-00000006"]


def test_configured_prompt_and_id_columns_are_used():
    rows = rows_of({"key": ["k1"], "text": ["a cat"]}, prompt_column="text", id_column="key")

    assert (rows[0].row_id, rows[0].prompt, rows[0].error) == ("k1", "a cat", None)


# --- batching -------------------------------------------------------------------------------------


def mixed_rows(n: int = 60, seed: int = 3):
    """Rows with a few distinct shapes, a few invalid, in a shuffled but fixed order."""
    rng = random.Random(seed)
    return rows_of(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "prompt": [rng.choice(["a cat", "a dog", ""]) for _ in range(n)],
            "width": [rng.choice([64, 128]) for _ in range(n)],
            "height": [rng.choice([64, None]) for _ in range(n)],
            "num_inference_steps": [rng.choice([4, 8]) for _ in range(n)],
            "guidance_scale": [rng.choice([5.0, 7.5, None]) for _ in range(n)],
        }
    )


@pytest.mark.parametrize("batch_size", [1, 3, 8, 100])
def test_batches_hold_every_valid_row_once_and_no_invalid_row(batch_size):
    rows = mixed_rows()

    batches = make_batches(rows, batch_size)

    batched = sorted(row.index for batch in batches for row in batch)
    assert batched == [row.index for row in rows if row.error is None]
    assert any(row.error for row in rows)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 100])
def test_batches_are_at_most_batch_size(batch_size):
    assert all(1 <= len(batch) <= batch_size for batch in make_batches(mixed_rows(), batch_size))


def test_a_batch_never_mixes_shapes_steps_or_guidance():
    for batch in make_batches(mixed_rows(), 8):
        assert len({BatchKey(r.width, r.height, r.num_inference_steps, r.guidance_scale) for r in batch}) == 1


def test_rows_of_one_key_keep_shard_order():
    batches = make_batches(mixed_rows(), 3)

    by_key: dict[BatchKey, list[int]] = {}
    for batch in batches:
        by_key.setdefault(batch[0].key, []).extend(row.index for row in batch)
    assert all(indexes == sorted(indexes) for indexes in by_key.values())


def test_batches_depend_only_on_rows_and_batch_size():
    def ids(batches):
        return [[row.row_id for row in batch] for batch in batches]

    assert ids(make_batches(mixed_rows(), 5)) == ids(make_batches(mixed_rows(), 5))


def test_only_full_batches_except_the_last_of_each_key():
    rows = rows_of({"prompt": prompts(10), "width": [64] * 7 + [128] * 3})

    assert [len(batch) for batch in make_batches(rows, 4)] == [4, 3, 3]


# --- seeds ----------------------------------------------------------------------------------------


def test_derive_seed_is_deterministic():
    assert derive_seed(0, "row-1") == derive_seed(0, "row-1")


def test_derive_seed_depends_on_job_seed_and_id():
    seeds = {derive_seed(job, row_id) for job in (0, 1, 2**40) for row_id in ("a", "b", "row-00001")}
    assert len(seeds) == 9


def test_derived_seeds_are_valid_int64_seeds():
    seeds = [derive_seed(job, f"row-{i}") for job in (0, -5, MAX_SEED) for i in range(300)]

    assert all(0 <= seed <= 2**63 - 1 for seed in seeds)
    assert max(seeds) > 2**62  # the whole range is used, not a narrow slice of it


def test_integer_parameters_written_as_whole_floats_are_accepted():
    """pandas stores an integer column that has nulls as float64: 512.0 means 512; 512.5 is refused."""
    rows = rows_of({"prompt": prompts(3), "width": [512.0, None, 512.5], "seed": [7.0, 8.0, None]})

    assert (rows[0].width, rows[0].seed, rows[0].error) == (512, 7, None)
    assert (rows[1].width, rows[1].seed, rows[1].error) == (DEFAULTS.width, 8, None)
    assert reason(rows[2]) == "invalid_parameter"
