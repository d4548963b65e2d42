"""The registry (workers/generators/registry.py) is the one place a model kind is declared: the spec,
the driver's model check and the actor's make_generator all read it, and nothing else lists kinds."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.kinds import KIND_NAMES, KINDS, kind_info
from imagemill.core.model_source import check_model_source
from imagemill.core.spec import ModelSpec
from imagemill.testing.tiny_janus import IMAGE_SIZE, make_tiny_janus
from imagemill.workers.generators.contract import BatchKey, Generator
from imagemill.workers.worker import make_generator


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, str]:
    """A tiny model directory of every kind that loads one."""
    janus = str(make_tiny_janus(tmp_path_factory.mktemp("models") / "tiny-janus"))
    return {"diffusers": tiny_model, "janus": janus, "noop": "", "emulated": "", "none": ""}


def _spec(tmp_path, kind: str, source: str, **generation):
    return imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)} | ({"image_column": "image"} if kind == "none" else {}),
            "output": {"path": str(tmp_path / "out")},
            "model": {"kind": kind, "source": source}
            | ({"emulation": {"images_per_second": 1000}} if kind == "emulated" else {}),
            "generation": generation,
        }
    )


def test_the_spec_accepts_exactly_the_registered_kinds():
    assert typing.get_args(ModelSpec.model_fields["kind"].annotation) == KIND_NAMES == tuple(KINDS)
    assert ModelSpec.model_fields["kind"].default in KINDS
    for info in KINDS.values():
        assert info.name in ModelSpec.model_fields["kind"].description, "each kind is described in the spec"


def test_the_fixture_covers_every_kind(models):
    """A new kind needs its tiny model here, else the next test would not build it."""
    assert set(models) == set(KINDS)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_kind_is_checked_by_its_marker_and_builds_a_generator(tmp_path, models, kind):
    info = kind_info(kind)
    size = IMAGE_SIZE if kind == "janus" else 32
    spec = _spec(tmp_path, kind, models[kind], width=size, height=size, num_inference_steps=1)
    check_model_source(spec.model)  # the driver's check passes on the kind's own directory
    if info.needs_model:
        assert Path(models[kind], info.marker).is_file()
        empty = tmp_path / "empty-model"
        empty.mkdir()
        with pytest.raises(ImagemillError, match=f"has no {info.marker}; it must be {info.description}"):
            check_model_source(spec.model.model_copy(update={"source": str(empty)}))

    generator = make_generator(spec, "cpu")
    assert type(generator) is info.generator_class() and isinstance(generator, Generator)
    # kind none draws the sources it is given (the spec requires input.image_column for it)
    sources = torch.full((2, size, size, 3), 7, dtype=torch.uint8)
    given = {"sources": sources} if info.sources == "required" else {}
    images = generator.generate(
        ["a red circle", "a blue star"], [None, "blurry"], [1, 2], BatchKey(size, size, 1, 3.0), **given
    )
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, size, size, 3)
    assert generator.truncated(["a red circle"]) == [False]


def test_an_unknown_kind_is_refused_in_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(ImagemillError) as refused:
        _spec(tmp_path, "dalle", "org/model")
    message = str(refused.value)
    assert "\n" not in message and "model.kind" in message
    assert all(f"'{kind}'" in message for kind in KIND_NAMES), message

    with pytest.raises(ImagemillError) as looked_up:
        kind_info("dalle")
    assert "\n" not in str(looked_up.value) and str(looked_up.value).endswith(", ".join(KIND_NAMES))


def test_the_registry_and_the_spec_import_no_model_library():
    """The driver imports the spec, and the spec the registry: neither may pull in torch or diffusers."""
    code = (
        "import sys, imagemill.core.spec, imagemill.core.kinds as r, "
        "imagemill.workers.generators.contract as c;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
