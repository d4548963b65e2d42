"""A misspelled key in a job spec (or a recipe, or `--set`) is one line naming the key, where it came
from and the closest key its section takes, instead of pydantic's "Extra inputs are not permitted"."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from imagemill.cli.commands import main
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import build_spec, load_spec
from imagemill.core.spec.sections import InputSpec, OutputSpec, WorkersSpec

MINIMAL = {"name": "t", "input": {"path": "in.parquet"}, "output": {"path": "out"}, "model": {"source": "m"}}
SECTIONS = {"input": InputSpec, "output": OutputSpec, "workers": WorkersSpec}


def test_a_misspelled_key_in_a_spec_file_names_the_key_the_file_and_the_fix(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "output": {"path": "out", "fromat": "files"}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"imagemill: error: unknown key `output.fromat` in job spec {path} — did you mean `format`?\n"
    )


def test_a_misspelled_set_key_names_the_set_flag(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ImagemillError) as caught:
        load_spec(path, [("input.row_per_shard", 16)])
    assert str(caught.value) == (
        "unknown key `input.row_per_shard` in --set input.row_per_shard — did you mean `rows_per_shard`?"
    )
    with pytest.raises(
        ImagemillError, match=r"unknown key `ouput` in --set ouput.path — did you mean `output`"
    ):
        load_spec(path, [("ouput.path", "x")])


@given(
    st.sampled_from(sorted(SECTIONS)).flatmap(
        lambda section: st.tuples(st.just(section), st.sampled_from(sorted(SECTIONS[section].model_fields)))
    ),
    st.data(),
)
def test_any_field_with_a_letter_dropped_is_pointed_back_at_a_field_of_its_section(section_field, data):
    section, field = section_field
    cut = data.draw(st.integers(0, len(field) - 1))
    typo = field[:cut] + field[cut + 1 :]
    fields = SECTIONS[section].model_fields
    if typo in fields or not typo:
        return
    spec = {**MINIMAL, section: {**MINIMAL.get(section, {}), typo: 1}}
    with pytest.raises(ImagemillError) as caught:
        build_spec(spec, origin="job spec job.yaml")
    message = str(caught.value)
    assert "\n" not in message and "Extra inputs" not in message
    assert f"unknown key `{section}.{typo}`" in message
    suggested = message.split("did you mean `")[1].split("`")[0]
    assert suggested in fields


@pytest.mark.parametrize("key", ["a\nb", "", "*", "../x", "x" * 300])
def test_a_hostile_key_stays_one_line(key):
    with pytest.raises(ImagemillError) as caught:
        build_spec({**MINIMAL, "output": {"path": "out", key: 1}})
    assert "\n" not in str(caught.value) and "unknown key `output." in str(caught.value)


def test_a_recipe_key_gets_the_same_hint(tmp_path):
    from imagemill.prompts.recipes import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"classes": [{"name": "a"}], "templates": ["a {class}"], "sed": 1}))
    with pytest.raises(ImagemillError) as caught:
        load_recipe(str(path))
    assert str(caught.value) == f"unknown key `sed` in recipe {path} — did you mean `seed`?"
