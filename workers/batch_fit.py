"""`workers.batch_size: auto`: the batch size an actor finds for its device when it loads the model.

On CUDA the generator draws batches of 1, 2, 4, … `MAX_AUTO_BATCH` images at the job's default size
until one runs out of device memory; the largest that fitted is the answer. The other models the job
loads (scorer, safety checker, feature model) are already on the device then, so their weights are
counted, though not their activations: the probe leaves the memory the caching allocator freed, and
a job whose scoring or evaluation needs more than that sets a number instead. It probes with
`PROBE_STEPS` denoising steps, since memory does not grow with the step count, only time does.

An actor sharing its GPU (`workers.gpus_per_worker` 1/n) probes within its share of the memory
(`keep_to_gpu_share`), so n actors each find the batch that fits beside the others.

Elsewhere (CPU, MPS) nothing is measured: memory is rarely the limit there and a large batch only
delays the first commit, so `auto` is `CPU_BATCH_SIZE`, the spec's default.

Batch size decides output bytes (docs/ARCHITECTURE.md, Determinism), so a job uses one value: the
first actor to load fixes it and the driver records it in `_job.json` (imagemill.planning.auto_batch).
"""

from __future__ import annotations

import logging

import torch

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import JobSpec
from imagemill.workers.generators.contract import BatchKey, Generator

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 64  # beyond this a batch no longer speeds up generation, it only delays commits
CPU_BATCH_SIZE = 8
PROBE_STEPS = 2


def resolve_batch_size(spec: JobSpec, generator: Generator, device: str) -> JobSpec:
    """`spec` with `auto` replaced by the batch size that fits `device`; a numbered spec unchanged."""
    if spec.workers.batch_size != "auto":
        return spec
    if not device.startswith("cuda"):
        return spec.with_batch_size(CPU_BATCH_SIZE)
    generation = spec.generation
    key = BatchKey(generation.width, generation.height, PROBE_STEPS, generation.guidance_scale)
    return spec.with_batch_size(largest_fitting_batch(generator, key))


def keep_to_gpu_share(spec: JobSpec, device: str) -> None:
    """With `workers.gpus_per_worker` 1/n, n actors share the GPU: cap this process's CUDA caching
    allocator at its share of the device's memory, so that the `auto` probe runs out of memory at the
    share, not at the whole device (then another actor would), and a batch never grows into a neighbour's."""
    share = spec.workers.gpus_per_worker
    if device.startswith("cuda") and share < 1:
        torch.cuda.set_per_process_memory_fraction(share, torch.device(device).index or 0)


def largest_fitting_batch(generator: Generator, key: BatchKey) -> int:
    """The largest power of two up to MAX_AUTO_BATCH whose batch `generator` draws at `key` without
    running out of CUDA memory."""
    fits = 0
    size = 1
    while size <= MAX_AUTO_BATCH:
        try:
            generator.generate(["a photo"] * size, [None] * size, list(range(size)), key)
            fitted = True
        except torch.cuda.OutOfMemoryError:
            fitted = False
        # after the except clause, so the error's frames no longer hold the batch's tensors
        torch.cuda.empty_cache()
        if not fitted:
            break
        fits = size
        size *= 2
    if fits == 0:
        raise ImagemillError(
            f"workers.batch_size: auto found that not even one {key.width}x{key.height} image fits in "
            "the device's memory: use a smaller size, a lower model.dtype or model.quantization"
        )
    log.info("workers.batch_size: auto chose %d for %dx%d", fits, key.width, key.height)
    return fits
