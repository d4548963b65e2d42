"""model.parallel and model.offload: a replica laid out another way draws the same images.

Context parallelism runs for real: two processes joined by gloo on this CPU (torch.multiprocessing,
independent of Ray, as the actor gang's processes are), each running diffusers' Ulysses attention
over the tiny FLUX; their images must be the one-process images within the determinism rule of
docs/ARCHITECTURE.md (a level in a few pixels, as between batch sizes). Components and offload are
checked for their plumbing on CPU (a worker there has one device, and offloading has nowhere to offload
to: layout.py); bench/gpu.sh measures offload on a GPU with its memory capped.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec
from imagemill.testing.tiny_families import make_tiny_family
from imagemill.workers.device_warnings import device_warnings
from imagemill.workers.generators.diffusion.generator import DiffusersGenerator
from imagemill.workers.rows import BatchKey

PROMPTS = ["a red cat", "a blue dog on the left", "a gold star"]
SEEDS = [1, 2, 3]
KEY = BatchKey(64, 32, 2, 3.5)  # 4x2 = 8 image tokens: they cut in two
ODD_KEY = BatchKey(48, 48, 2, 3.5)  # 3x3 = 9 image tokens: they do not


def _draw(generator: DiffusersGenerator, key: BatchKey = KEY) -> torch.Tensor:
    return generator.generate(PROMPTS, [None] * len(PROMPTS), SEEDS, key)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> str:
    return str(make_tiny_family("flux", tmp_path_factory.mktemp("flux") / "flux"))


@pytest.fixture(scope="module")
def one_process_images(tiny_flux) -> torch.Tensor:
    return _draw(DiffusersGenerator(tiny_flux, "float32", "cpu"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _context_rank(rank: int, world: int, port: int, flux: str, sd: str, out: str) -> None:
    """One process of the gang: its images, whether its denoiser is parallel, and what it refused."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    try:
        generator = DiffusersGenerator(flux, "float32", "cpu", parallel="context")
        result: dict = {
            "images": _draw(generator),
            "parallel": generator.pipe.transformer._parallel_config is not None,
        }
        try:
            _draw(generator, ODD_KEY)
        except ValueError as exc:
            result["odd_size"] = str(exc)
        try:
            DiffusersGenerator(sd, "float32", "cpu", parallel="context")
        except ImagemillError as exc:
            result["unet"] = str(exc)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.model
@pytest.mark.slow
def test_context_parallel_over_two_processes_draws_the_one_process_images(
    tiny_flux, one_process_images, tiny_model, tmp_path
):
    mp.spawn(_context_rank, args=(2, _free_port(), tiny_flux, tiny_model, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(rank["parallel"] for rank in ranks)  # diffusers' context parallelism ran, on both
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])  # every rank holds the batch's images
    difference = (ranks[0]["images"].int() - one_process_images.int()).abs()
    assert difference.max() <= 1, "context parallelism moved a pixel by more than a level"
    assert (difference > 0).float().mean() < 0.05
    assert "9 image tokens over 2 processes" in ranks[0]["odd_size"]
    assert "model.parallel: context" in ranks[0]["unet"] and "components" in ranks[0]["unet"]


@pytest.mark.model
@pytest.mark.parametrize(
    "layout", [{"parallel": "components"}, *({"offload": mode} for mode in ("model", "group", "sequential"))]
)
def test_components_and_offload_load_and_draw_the_same_bytes_on_cpu(tiny_flux, one_process_images, layout):
    generator = DiffusersGenerator(tiny_flux, "float32", "cpu", **layout)
    images = _draw(generator)
    assert images.device.type == "cpu"
    assert torch.equal(images, one_process_images)


def _spec(**model) -> JobSpec:
    return JobSpec.model_validate(
        {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"source": "m", **model}}
    )


def test_offload_is_not_fingerprinted_and_parallel_is():
    """Offloading runs the same kernels on the same numbers (byte-identical, above): a resume may
    change it; context parallelism moves pixels as a batch size does, and batch_size is fingerprinted."""
    assert _spec(offload="group").fingerprint() == _spec().fingerprint()
    assert _spec(parallel="context").fingerprint() != _spec().fingerprint()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"parallel": "context", "offload": "model"}, "set one of them to none"),
        ({"kind": "emulated", "emulation": {"images_per_second": 3}, "offload": "group"}, "kind: diffusers"),
        ({"parallel": "tensor"}, "parallel"),
    ],
)
def test_layouts_that_cannot_be_are_refused(model, message):
    with pytest.raises(ValidationError, match=message):
        _spec(**model)


def test_cpu_workers_are_told_offload_and_components_do_nothing_there():
    assert device_warnings(_spec(offload="sequential"), "cpu") == [
        "model.offload: a CPU worker's weights already are in host memory, so offloading does nothing "
        "there; set model.offload: none for CPU workers"
    ]
    assert any(
        line.startswith("model.parallel") for line in device_warnings(_spec(parallel="components"), "cpu")
    )
    assert device_warnings(_spec(offload="sequential"), "cuda") == []


def test_the_guides_flux_command_asks_for_group_offload(monkeypatch):
    """docs/big-and-small-models.md's command through the CLI, up to the runner (a GPU runs the rest;
    here the hub is offline): FLUX.1-dev in bfloat16, offloaded by groups, at 1024²."""
    from doc_pages import ROOT, command

    import imagemill.execution.runner as runner
    from imagemill.cli.commands import main

    ran: list[JobSpec] = []

    class Finished:
        state = "complete"

        def summary(self) -> str:
            return "finished"

    monkeypatch.setattr(runner, "run", lambda spec, **options: ran.append(spec) or Finished())
    monkeypatch.chdir(ROOT)
    words = command("docs/big-and-small-models.md", "imagemill run")
    main(words[1:])
    [spec] = ran
    assert spec.model.source == "black-forest-labs/FLUX.1-dev" and spec.model.dtype == "bfloat16"
    assert (spec.model.offload, spec.model.parallel) == ("group", "none")
    assert (spec.generation.width, spec.generation.height) == (1024, 1024)
