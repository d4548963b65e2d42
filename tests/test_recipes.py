"""Dataset recipes (`imagemill prompts RECIPE.yaml OUT`): exact quotas, stable ids, byte-identical files,
both samplings, and one-line refusals for recipes that cannot be made."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_bucket
from hypothesis import given, settings
from hypothesis import strategies as st

from imagemill.cli.commands import main
from imagemill.core.errors import ImagemillError
from imagemill.prompts.recipes import _distinct_draws, write_prompts

RECIPE = {
    "classes": [
        {"name": "circle", "synonyms": ["round disc"], "category": "shape"},
        {"name": "square", "category": "shape", "quota": 7},
        {"name": "triangle", "category": "shape"},
    ],
    "templates": ["a {colour} {class} on a {background} background", "a {class}, a kind of {category}"],
    "slots": {"colour": ["red", "green", "blue"], "background": ["white", "black"]},
    # circle: 2 words x (3 x 2 + 1) = 14 combinations; square, triangle: 7 each
    "quota": 5,
    "sampling": "random",
    "seed": 3,
    "row_group_size": 4,
}


def _write(tmp_path: Path, recipe: dict, name: str = "out.parquet", **kwargs):
    source = tmp_path / f"{name}.yaml"
    source.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return write_prompts(str(source), str(tmp_path / name), **kwargs)


def _rows(table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def test_quotas_are_exact_and_rows_carry_label_class_and_slot_values(tmp_path):
    table = _write(tmp_path, RECIPE)
    assert Counter(table["class_name"].to_pylist()) == {"circle": 5, "square": 7, "triangle": 5}
    assert table.column_names == [
        "id", "prompt", "label", "class_name", "category", "template", "colour", "background",
    ]  # fmt: skip
    read = pq.read_table(tmp_path / "out.parquet")
    assert read.equals(table)
    assert [pq.ParquetFile(tmp_path / "out.parquet").metadata.row_group(i).num_rows for i in range(5)] == [
        4, 4, 4, 4, 1,
    ]  # fmt: skip
    rows = _rows(table)
    quotas = {"circle": 5, "square": 7, "triangle": 5}
    assert set(rows) == {f"{name}-{k}" for name, quota in quotas.items() for k in range(quota)}
    for row in rows.values():
        assert row["label"] == ["circle", "square", "triangle"].index(row["class_name"])
        if row["template"] == 0:
            assert row["prompt"] == f"a {row['colour']} {_word(row)} on a {row['background']} background"
        else:
            assert row["prompt"] == f"a {_word(row)}, a kind of shape" and row["colour"] is None
    assert len({row["prompt"] for row in rows.values()}) == len(rows), "no prompt repeats"
    assert [rows[f"square-{k}"]["prompt"] for k in range(7)] != sorted(
        rows[f"square-{k}"]["prompt"] for k in range(7)
    ), "random sampling shuffles"


def _word(row: dict) -> str:
    return "round disc" if "round disc" in row["prompt"] else row["class_name"]


def test_the_same_recipe_writes_the_same_bytes_and_ids_keep_their_prompts(tmp_path):
    _write(tmp_path, RECIPE, "a.parquet")
    _write(tmp_path, RECIPE, "b.parquet")
    first = hashlib.sha256((tmp_path / "a.parquet").read_bytes()).hexdigest()
    assert first == hashlib.sha256((tmp_path / "b.parquet").read_bytes()).hexdigest()

    before = _rows(pq.read_table(tmp_path / "a.parquet"))
    # More rows, another class first and one class gone: every surviving id keeps its prompt.
    grown = {**RECIPE, "quota": 6, "classes": [{"name": "star", "category": "shape"}, *RECIPE["classes"][:2]]}
    after = _rows(_write(tmp_path, grown, "c.parquet"))
    for key, row in before.items():
        if not key.startswith("triangle"):
            assert after[key]["prompt"] == row["prompt"] and after[key]["label"] == row["label"] + 1
    assert "circle-5" in after and "star-0" in after


def test_cartesian_sampling_takes_every_combination_in_order(tmp_path):
    recipe = {**RECIPE, "sampling": "cartesian", "quota": None, "classes": [{"name": "circle"}]}
    recipe["templates"] = RECIPE["templates"][:1]
    prompts = _write(tmp_path, recipe)["prompt"].to_pylist()
    assert prompts == [
        f"a {c} circle on a {b} background" for c in ("red", "green", "blue") for b in ("white", "black")
    ]


def test_random_sampling_depends_on_the_seed(tmp_path):
    one = _write(tmp_path, RECIPE, "one.parquet")["prompt"].to_pylist()
    other = _write(tmp_path, {**RECIPE, "seed": 4}, "other.parquet")["prompt"].to_pylist()
    assert sorted(one) != sorted(other) or one != other


def test_a_quota_above_the_combinations_is_refused_unless_repeats_are_allowed(tmp_path):
    recipe = {**RECIPE, "quota": 15}  # square and triangle have 7 combinations each
    with pytest.raises(ImagemillError, match=r"class 'triangle' asks for 15 rows .* make only 7 distinct"):
        _write(tmp_path, {**recipe, "classes": RECIPE["classes"][2:]})
    with pytest.raises(ImagemillError) as caught:
        _write(tmp_path, {**recipe, "classes": RECIPE["classes"][:1]})
    assert str(caught.value) == (
        "recipe: class 'circle' asks for 15 rows but its templates, words and slots make only 14 distinct "
        "prompts: lower the quota, add slot values or set allow_repeats: true"
    )
    table = _write(tmp_path, {**recipe, "allow_repeats": True}, "repeats.parquet")
    rows = table.to_pylist()
    prompts = Counter(row["prompt"] for row in rows if row["class_name"] == "triangle")
    assert sum(prompts.values()) == 15 and set(prompts.values()) == {2, 3}, "all twice before a third"


def test_a_recipe_of_too_many_rows_is_refused_before_any_is_made(tmp_path):
    recipe = {**RECIPE, "allow_repeats": True, "quota": 6_000_000}  # square keeps its own quota, 7
    with pytest.raises(ImagemillError, match=r"its quotas make 12,000,007 rows, more than 10,000,000"):
        _write(tmp_path, recipe)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"templates": ["a {colour} {class} in {lighting}"]}, r"templates\.0 names slot '\{lighting\}'"),
        ({"templates": ["a {colour} thing"]}, r"templates\.0 does not name \{class\}"),
        ({"templates": ["a {class!r}"]}, r"a slot is a plain \{name\}"),
        ({"templates": ["a {class} {colour}"]}, r"slot 'background' is defined but no template names it"),
        ({"slots": {"prompt": ["x"]}}, r"slot 'prompt' needs a name"),
        ({"classes": [{"name": "a"}, {"name": "a"}]}, r"class 'a' is listed twice"),
        ({"classes": [{"name": "a", "quota": 0}]}, r"classes\.0\.quota: Input should be greater than 0"),
        ({"sampling": "grid"}, r"sampling: Input should be 'cartesian' or 'random'"),
        ({"quotas": 3}, r"unknown key `quotas` in recipe .* — did you mean `quota`\?"),
    ],
)
def test_bad_recipes_are_refused_in_one_line_naming_the_key(tmp_path, change, message):
    with pytest.raises(ImagemillError, match=message) as caught:
        _write(tmp_path, {**RECIPE, **change})
    assert "\n" not in str(caught.value)


def test_the_cli_writes_to_a_url_and_keeps_an_existing_file(tmp_path, s3_endpoint, capsys):
    bucket = make_bucket("imagemill-recipes")
    source = tmp_path / "recipe.yaml"
    source.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = f"{bucket}/sets/shapes.parquet"
    assert main(["prompts", str(source), out]) == 0
    assert capsys.readouterr().out.strip() == f"17 prompts of 3 classes written to {out}"
    with fsspec.open(out, "rb") as f:
        assert pq.read_table(f).num_rows == 17
    assert main(["prompts", str(source), out]) == 2
    assert capsys.readouterr().err.strip() == (
        f"imagemill: error: {out} already exists: pass --overwrite to replace it"
    )
    assert main(["prompts", str(source), out, "--overwrite"]) == 0
    assert main(["prompts", str(source), bucket]) == 2
    assert "is a folder: name the Parquet file to write" in capsys.readouterr().err


# 2 words x 8 slots of 256 values: 2**65 combinations, more than numpy's int64 can count.
HUGE_SLOTS = {f"s{n}": [f"v{n}x{value}" for value in range(256)] for n in range(8)}
HUGE = {
    "classes": [{"name": "circle", "synonyms": ["disc"]}],
    "templates": ["a {class} " + " ".join(f"{{{name}}}" for name in HUGE_SLOTS)],
    "slots": HUGE_SLOTS,
    "quota": 40,
    "sampling": "random",
    "seed": 5,
}


def test_a_recipe_of_more_than_2_to_the_63_combinations_draws_its_rows_deterministically(tmp_path):
    table = _write(tmp_path, HUGE, "a.parquet")
    _write(tmp_path, HUGE, "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    rows = table.to_pylist()
    assert len(rows) == 40 and len({row["prompt"] for row in rows}) == 40, "no prompt repeats"
    for row in rows:
        words = " ".join(row[name] for name in HUGE_SLOTS)
        assert row["prompt"] in (f"a circle {words}", f"a disc {words}")
    # Uniform over 2**65: the leading word and the first slot (the highest digits) both vary.
    assert {row["prompt"].split()[1] for row in rows} == {"circle", "disc"}
    assert len({row["s0"] for row in rows}) > 10


@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=1, max_value=2**200), seed=st.integers(0, 2**32))
def test_distinct_draws_stay_below_any_count_and_repeat_for_a_seed(count, seed):
    take = min(count, 50)
    first = list(itertools.islice(_distinct_draws(np.random.default_rng(seed), count), take))
    again = list(itertools.islice(_distinct_draws(np.random.default_rng(seed), count), take))
    assert first == again and len(set(first)) == take
    assert all(isinstance(index, int) and 0 <= index < count for index in first)


@settings(max_examples=40, deadline=None)
@given(
    quotas=st.lists(st.integers(1, 60), min_size=2, max_size=5),
    seed=st.integers(0, 2**32),
    window=st.integers(2, 40),
)
def test_the_classes_are_interleaved_so_every_run_of_rows_mixes_labels(quotas, seed, window):
    """Any run of rows (a shard, a row group, a loader's first batch) holds each class in about its
    share (off by at most the number of classes, whatever the quotas); the ids and prompts are those
    of the class-by-class listing, only their place in the file changes."""
    from imagemill.prompts.recipes import Recipe, recipe_table

    classes = [{"name": f"c{index}", "quota": quota} for index, quota in enumerate(quotas)]
    recipe = Recipe.model_validate(
        {"classes": classes, "templates": ["a {class} {n}"], "slots": {"n": [str(i) for i in range(60)]},
         "seed": seed}
    )  # fmt: skip
    table = recipe_table(recipe)
    labels = table["label"].to_pylist()
    total = len(labels)
    assert sorted(table["id"].to_pylist()) == sorted(
        f"c{c}-{k}" for c, q in enumerate(quotas) for k in range(q)
    )
    for label in range(len(quotas)):  # row k of a class comes before row k + 1
        ks = [int(i.split("-")[1]) for i in table["id"].to_pylist() if i.startswith(f"c{label}-")]
        assert ks == sorted(ks)
    for start in range(0, max(total - window, 0) + 1, max(window // 2, 1)):
        counts = Counter(labels[start : start + window])
        for label, quota in enumerate(quotas):
            expected = quota * min(window, total) / total
            assert abs(counts[label] - expected) <= len(quotas), (start, window, counts, quotas)
    assert recipe_table(recipe) == table  # seeded: the same recipe, the same order
