"""Shard planning from Parquet footers: grouping, stable ids, input spellings, and error messages."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import prompt_table

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import InputSpec
from imagemill.planning.shards import file_key, plan_shards, resume_whole_group_shards


def write_parquet(path: Path, n_rows: int, row_group_size: int, table: pa.Table | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if table is not None else prompt_table(n_rows), path, row_group_size=row_group_size)
    return path


def plan(path: Path | str, rows_per_shard: int = 1024, **fields):
    return plan_shards(InputSpec(path=str(path), rows_per_shard=rows_per_shard, **fields))


def ranges(shards) -> list[tuple[int, int, int, int]]:
    return [(s.row_group_start, s.row_group_end, s.first_row, s.num_rows) for s in shards]


@pytest.fixture
def three_files(tmp_path: Path) -> Path:
    """3 files × 25 rows, row groups of 10 → row groups of 10, 10 and 5 rows per file."""
    for index in range(3):
        write_parquet(tmp_path / f"part-{index}.parquet", n_rows=25, row_group_size=10)
    return tmp_path


# --- grouping -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows_per_shard", "expected"),
    [
        (20, [(0, 2, 0, 20), (2, 3, 20, 5)]),
        (15, [(0, 2, 0, 20), (2, 3, 20, 5)]),
        (10, [(0, 1, 0, 10), (1, 2, 10, 10), (2, 3, 20, 5)]),
        (1000, [(0, 3, 0, 25)]),
    ],
)
def test_row_groups_are_grouped_into_shards_of_about_rows_per_shard(three_files, rows_per_shard, expected):
    result = plan(three_files, rows_per_shard)

    assert len(result.files) == 3
    for url in result.files:
        assert ranges(s for s in result.shards if s.file_url == url) == expected


def pieces(shards) -> list[tuple[int, int | None, int, int]]:
    return [(s.row_group_start, s.row_offset, s.first_row, s.num_rows) for s in shards]


def test_a_row_group_larger_than_rows_per_shard_is_cut_into_pieces(tmp_path):
    """pandas' to_parquet writes one row group: 64 rows with rows_per_shard 16 are 4 shards."""
    path = tmp_path / "one.parquet"
    prompt_table(64).to_pandas().to_parquet(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1

    result = plan(tmp_path, rows_per_shard=16)

    assert pieces(result.shards) == [(0, 0, 0, 16), (0, 16, 16, 16), (0, 32, 32, 16), (0, 48, 48, 16)]
    assert shard_ids(result) == [
        "one-rg00000-r000000000-000000016",
        "one-rg00000-r000000016-000000032",
        "one-rg00000-r000000032-000000048",
        "one-rg00000-r000000048-000000064",
    ]
    assert result.total_rows == 64


def test_small_row_groups_are_gathered_around_a_large_one_and_a_small_remainder_joins_the_last_piece(
    tmp_path,
):
    table = prompt_table(45)
    path = tmp_path / "mixed.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        for start, length in [(0, 3), (3, 3), (6, 33), (39, 3), (42, 3)]:  # 33 rows: 10, 10, 13
            writer.write_table(table.slice(start, length))

    result = plan(tmp_path, rows_per_shard=10)

    assert pieces(result.shards) == [
        (0, None, 0, 6),
        (2, 0, 6, 10),
        (2, 10, 16, 10),
        (2, 20, 26, 13),
        (3, None, 39, 6),
    ]
    assert [s.row_group_end for s in result.shards] == [2, 3, 3, 3, 5]
    rows = [row for s in result.shards for row in range(s.first_row, s.first_row + s.num_rows)]
    assert rows == list(range(45))


def test_a_row_group_under_one_and_a_half_shards_stays_whole(tmp_path):
    write_parquet(tmp_path / "f.parquet", n_rows=14, row_group_size=14)

    assert ranges(plan(tmp_path, rows_per_shard=10).shards) == [(0, 1, 0, 14)]


def test_total_rows_equals_rows_written(three_files):
    assert plan(three_files, rows_per_shard=7).total_rows == 75


@pytest.mark.parametrize("rows_per_shard", [1, 10, 15, 20, 1000])
def test_shards_cover_every_row_exactly_once(three_files, rows_per_shard):
    result = plan(three_files, rows_per_shard)

    for url in result.files:
        file_shards = [s for s in result.shards if s.file_url == url]
        whole = [
            rg
            for s in file_shards
            if s.row_offset is None
            for rg in range(s.row_group_start, s.row_group_end)
        ]
        cut = [s.row_group_start for s in file_shards if s.row_offset is not None]
        assert sorted({*whole, *cut}) == list(range(3)) and not set(whole) & set(cut)
        rows = [row for s in file_shards for row in range(s.first_row, s.first_row + s.num_rows)]
        assert rows == list(range(25))


# --- stable ids -----------------------------------------------------------------------------------


def shard_ids(result) -> list[str]:
    return [s.shard_id for s in result.shards]


def test_planning_twice_gives_the_same_shard_ids(three_files):
    assert shard_ids(plan(three_files, 10)) == shard_ids(plan(three_files, 10))


def test_shard_ids_do_not_depend_on_where_the_input_folder_lives(three_files, tmp_path_factory):
    moved = tmp_path_factory.mktemp("elsewhere") / "copy"
    shutil.copytree(three_files, moved)

    assert shard_ids(plan(moved, 10)) == shard_ids(plan(three_files, 10))
    assert {s.file_key for s in plan(moved, 10).shards} == {"part-0", "part-1", "part-2"}


def test_shard_ids_are_unique(three_files):
    ids = shard_ids(plan(three_files, 10))
    assert len(ids) == len(set(ids)) == 9


def test_adding_a_file_keeps_old_shard_ids_and_adds_new_ones(three_files):
    before = shard_ids(plan(three_files, 10))
    write_parquet(three_files / "part-new.parquet", n_rows=12, row_group_size=10)
    write_parquet(three_files / "a-first.parquet", n_rows=5, row_group_size=10)  # sorts before the rest

    after = shard_ids(plan(three_files, 10))

    assert set(before) < set(after)
    assert len(after) == len(set(after)) == len(before) + 3


# --- input spellings ------------------------------------------------------------------------------


def test_input_can_be_a_single_file(three_files):
    result = plan(three_files / "part-1.parquet", 10)

    assert len(result.files) == 1 and result.files[0].endswith("part-1.parquet")
    assert result.total_rows == 25
    assert {s.file_key for s in result.shards} == {"part-1"}


def test_input_folder_is_searched_recursively_for_parquet_files_only(tmp_path):
    write_parquet(tmp_path / "top.parquet", n_rows=3, row_group_size=10)
    write_parquet(tmp_path / "sub" / "deeper" / "nested.parquet", n_rows=4, row_group_size=10)
    (tmp_path / "notes.txt").write_text("not parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")

    result = plan(tmp_path)

    assert sorted(Path(url).name for url in result.files) == ["nested.parquet", "top.parquet"]
    assert result.total_rows == 7


def test_input_can_be_a_glob(three_files):
    folder_ids = shard_ids(plan(three_files))
    write_parquet(three_files / "other.parquet", n_rows=5, row_group_size=10)

    result = plan(three_files / "part-*.parquet")

    assert sorted(Path(url).name for url in result.files) == [f"part-{i}.parquet" for i in range(3)]
    assert result.total_rows == 75
    assert shard_ids(result) == folder_ids  # the same ids as when the folder is given


def test_a_glob_takes_only_parquet_files(three_files):
    """Named *.parquet or starting with PAR1: not the README or the _SUCCESS marker next to the data."""
    (three_files / "README.txt").write_text("prompts for the nightly job")
    (three_files / "_SUCCESS").write_bytes(b"")
    (three_files / "part-3").write_bytes((three_files / "part-0.parquet").read_bytes())  # no suffix

    result = plan(three_files / "*", 10)

    assert sorted(Path(url).name for url in result.files) == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
        "part-3",
    ]
    assert result.unreadable == [] and result.total_rows == 100


def test_files_with_the_same_name_in_sub_folders_get_distinct_keys_and_ids(tmp_path):
    for folder in ("a", "b", "a_b"):
        write_parquet(tmp_path / folder / "part.parquet", n_rows=3, row_group_size=10)
    write_parquet(tmp_path / "a_part.parquet", n_rows=3, row_group_size=10)

    result = plan(tmp_path)

    keys = [s.file_key for s in result.shards]
    assert len(keys) == len(set(keys)) == 4
    assert len(set(shard_ids(result))) == 4


# --- errors ---------------------------------------------------------------------------------------


def test_missing_input_path_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ImagemillError, match=re.escape(str(missing))):
        plan(missing)


def test_folder_without_parquet_files_says_so(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ImagemillError, match="no Parquet files"):
        plan(tmp_path)


def test_missing_prompt_column_names_the_file_and_the_columns_found(tmp_path):
    table = pa.table({"uid_col": ["x"], "caption_col": ["a cat"]})
    write_parquet(tmp_path / "wrong.parquet", n_rows=1, row_group_size=10, table=table)

    with pytest.raises(ImagemillError) as excinfo:
        plan(tmp_path)

    message = str(excinfo.value)
    assert "wrong.parquet" in message and "'prompt'" in message
    assert "uid_col" in message and "caption_col" in message


def test_other_prompt_column_can_be_configured(tmp_path):
    table = pa.table({"text": ["a cat", "a dog"]})
    write_parquet(tmp_path / "t.parquet", n_rows=2, row_group_size=10, table=table)

    assert plan(tmp_path, prompt_column="text").total_rows == 2


def test_a_file_missing_the_prompt_column_fails_alone(three_files):
    write_parquet(
        three_files / "captions.parquet", n_rows=1, row_group_size=10, table=pa.table({"caption": ["x"]})
    )

    result = plan(three_files, 10)

    (unreadable,) = result.unreadable
    assert unreadable.shard_id == "captions-unreadable"
    assert "captions.parquet" in unreadable.error and "'prompt'" in unreadable.error
    assert "\n" not in unreadable.error
    assert result.total_rows == 75 and len(result.shards) == 9


def test_corrupt_parquet_file_is_named_and_does_not_stop_the_others(three_files):
    (three_files / "x.parquet").write_bytes(b"this is not a parquet file at all")

    result = plan(three_files, 10)

    (unreadable,) = result.unreadable
    assert unreadable.file_url.endswith("/x.parquet")
    assert "x.parquet" in unreadable.error
    assert result.total_rows == 75 and len(result.shards) == 9
    assert unreadable.shard_id not in shard_ids(result)


# --- file keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    ["plain.parquet", "with space.parquet", "ünïcødé.parquet", "a/b/c.parquet", "we?ird*[name].parquet"],
)
def test_file_key_is_safe_in_object_keys(relative):
    assert re.fullmatch(r"[A-Za-z0-9._-]+", file_key(relative))


def test_file_key_keeps_plain_names_and_separates_look_alikes():
    assert file_key("part-000.parquet") == "part-000"
    look_alikes = ["a_b.parquet", "a/b.parquet", "a b.parquet", "a?b.parquet"]
    assert len({file_key(path) for path in look_alikes}) == len(look_alikes)


def test_a_file_is_identified_by_its_footer_the_same_after_an_identical_rewrite(tmp_path):
    """Input identity (imagemill.planning.inputs): unchanged by a rewrite of the same rows, changed by
    other rows."""
    path = tmp_path / "part.parquet"
    pq.write_table(prompt_table(8), path, row_group_size=4)
    before = plan_shards(InputSpec(path=str(tmp_path))).footers

    pq.write_table(prompt_table(8), path, row_group_size=4)
    assert plan_shards(InputSpec(path=str(tmp_path))).footers == before

    pq.write_table(prompt_table(8, start=1), path, row_group_size=4)
    after = plan_shards(InputSpec(path=str(tmp_path))).footers
    assert after.keys() == before.keys() == {path.as_uri()} and after != before


# --- resuming outputs cut by row groups only -----------------------------------------------------------


def test_a_file_with_a_committed_whole_row_group_shard_resumes_with_its_whole_row_group_shards(tmp_path):
    """An output made before row groups were cut: a committed `-rg<a>-<b>` shard keeps its file's old cut."""
    write_parquet(tmp_path / "old.parquet", n_rows=64, row_group_size=32)
    write_parquet(tmp_path / "new.parquet", n_rows=64, row_group_size=32)
    fresh = plan(tmp_path, rows_per_shard=16)
    assert len(fresh.shards) == 8 and all(s.row_offset is not None for s in fresh.shards)

    resumed = resume_whole_group_shards(fresh, committed={"old-rg00000-00001"})

    assert [s.shard_id for s in resumed.shards if s.file_key == "old"] == [
        "old-rg00000-00001",
        "old-rg00001-00002",
    ]
    assert [s.shard_id for s in resumed.shards if s.file_key == "new"] == shard_ids(fresh)[:4]
    assert resumed.total_rows == fresh.total_rows == 128
    assert resume_whole_group_shards(fresh, committed=set(shard_ids(fresh)[4:6])) == fresh
