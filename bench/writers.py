"""The writer path: images/s per CPU core from generated pixels to committed files, per format and place.

    python bench/writers.py                       # writes BENCHMARKS.md's "Writer path" section
    python bench/writers.py --images 8 --sizes 512   # a quick look

Unlike bench/encode_ceiling.py, which times Pillow alone, this runs the actor's own code: a job's
shards through the in-process `ShardWorker` (imagemill.testing.in_process: two shard calls at once,
4 writer threads, parameters embedded as in a default job), with the no-op generator handing out
textured images (encode_ceiling.textured; flat colours would compress to nothing) instead of solid
colours, so everything but the model is measured: read the shard, copy to the host, encode, write,
metadata Parquet, commit. Written to a local folder and to an S3 endpoint (moto's server, in its own
process, on loopback: no network time, but s3fs's client work is counted).

"Cores": the CPUs this process may run on (`os.sched_setaffinity`), with torch's thread count set to
the same; the writer threads stay at imagemill's 4. The per-core rate is images per CPU-second of this
process (all its threads; moto's server not counted), at the most cores measured: unlike images/s it
holds on a machine shared with other work, which only stretches the wall clock. The cores a GPU
making 10, 30 or 60 images/s needs = ceil(rate ÷ per-core rate). "Cores busy" = CPU-seconds ÷
wall-seconds at the most cores: near the core count when the writers run in parallel (encoders
release the GIL), near 1 when they are bound by it, lower when other work shares the machine. Each
setting is measured in one run, interleaved, the best of 2 kept, so their ratios hold side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from encode_ceiling import GPU_RATES
from throughput import _machine, publish

import imagemill
import imagemill.workers.worker as worker_module
from imagemill.testing.in_process import load_worker, run_shards
from imagemill.workers.generators.emulated import textured
from imagemill.workers.generators.noop import NoopGenerator

# format → images per measurement, relative to PNG's: the faster encoders get more, so that every
# measurement lasts seconds, not milliseconds
FORMATS = {"png": 1, "jpeg": 4, "webp": 2}
ROUNDS = 2  # each setting measured this many times, interleaved; the best kept (least disturbed)
TEXTURES = 8  # distinct images per size, handed out by seed
ROWS_PER_SHARD = 4


class TexturedNoop(NoopGenerator):
    """The no-op generator with realistic pixels: a textured image picked by the row's seed."""

    textures: dict[int, list[torch.Tensor]] = {}  # by image size

    def generate(self, prompts, negative_prompts, seeds, key) -> torch.Tensor:
        pool = self.textures[key.width]
        return torch.stack([pool[seed % len(pool)] for seed in seeds])


def _use_textured_noop() -> None:
    """Every worker this process loads gets a TexturedNoop (the bench's one hook into the worker)."""
    worker_module.make_generator = lambda spec, device: TexturedNoop()


@contextmanager
def _s3_endpoint() -> Iterator[str]:
    """moto's S3 server in a child process (so its work is not on the measured cores); its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        for _ in range(100):
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem().mkdir("bench-writers")
        yield "s3://bench-writers"
    finally:
        server.terminate()
        server.wait()


@contextmanager
def _on_cores(cores: int) -> Iterator[None]:
    allowed = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, sorted(allowed)[:cores])
    torch.set_num_threads(cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def _prompts(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    table = pa.table(
        {"id": [f"row-{i:05d}" for i in range(rows)], "prompt": [f"a photo {i}" for i in range(rows)]}
    )
    pq.write_table(table, folder / "prompts.parquet", row_group_size=ROWS_PER_SHARD)


def _measure(inputs: Path, output: str, size: int, image_format: str, rows: int) -> tuple[float, float]:
    """The job's images/s (wall clock) and images per CPU-second of this process (all its threads)."""
    spec = imagemill.build_spec(
        {
            "input": {"path": str(inputs), "rows_per_shard": ROWS_PER_SHARD},
            "output": {"path": output, "image_format": image_format},
            "model": {"kind": "noop"},
            "generation": {"width": size, "height": size},
            "workers": {"batch_size": ROWS_PER_SHARD},
        }
    )
    worker = load_worker(spec)
    started, cpu_started = time.perf_counter(), time.process_time()
    stats = run_shards(worker)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    worker.writers.shutdown()
    assert sum(shard.ok for shard in stats) == rows, "every image written"
    return rows / seconds, rows / cpu_seconds


def _warm_up(scratch: Path, places: dict[str, str]) -> None:
    """One small job per place and format first, so imports and connections are not measured."""
    inputs = scratch / "prompts-warm-up"
    _prompts(inputs, ROWS_PER_SHARD)
    TexturedNoop.textures[64] = [torch.from_numpy(textured(64, 64, seed)) for seed in range(TEXTURES)]
    for root in places.values():
        for image_format in FORMATS:
            _measure(inputs, f"{root}/warm-up-{image_format}", 64, image_format, ROWS_PER_SHARD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=16, help="images per measurement at 512² (1024²: a quarter)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    every = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--cores", type=int, nargs="+", default=sorted({1, 2, every}), help="default: 1, 2, all"
    )
    args = parser.parse_args()
    cores_list = sorted({n for n in args.cores if n <= every})
    _use_textured_noop()
    scratch = Path(tempfile.mkdtemp(prefix="imagemill-bench-writers-"))
    rows_out = []
    started, load = time.perf_counter(), os.getloadavg()[0]
    try:
        with _s3_endpoint() as bucket:
            places = {"local": str(scratch / "out"), "S3": bucket}
            _warm_up(scratch, places)
            for size in args.sizes:
                TexturedNoop.textures[size] = [
                    torch.from_numpy(textured(size, size, seed)) for seed in range(TEXTURES)
                ]
                for image_format, scale in FORMATS.items():
                    rows = max(2, args.images * scale * 512**2 // size**2 // ROWS_PER_SHARD) * ROWS_PER_SHARD
                    inputs = scratch / f"prompts-{size}-{image_format}"
                    _prompts(inputs, rows)
                    for place, root in places.items():
                        rates: dict[int, float] = {}  # images/s by cores
                        per_cpu: dict[int, float] = {}  # images per CPU-second by cores
                        for run in range(ROUNDS):
                            for cores in cores_list:
                                output = f"{root}/{size}-{image_format}-{cores}-{run}"
                                with _on_cores(cores):
                                    rate, cpu_rate = _measure(inputs, output, size, image_format, rows)
                                rates[cores] = max(rate, rates.get(cores, 0.0))
                                per_cpu[cores] = max(cpu_rate, per_cpu.get(cores, 0.0))
                        per_core = per_cpu[max(per_cpu)]  # at the most cores: with their sharing costs
                        rows_out.append(_row(size, image_format, place, rows, rates, per_core))
                        print(rows_out[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    section = "\n".join(
        [
            "## Writer path: images/s per core through the worker's writers, and the cores a GPU needs",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, in {seconds:.0f} s "
            f"(load average {load:.1f} at the start).",
            f"Reproduce: `python bench/writers.py --images {args.images} --sizes "
            f"{' '.join(map(str, args.sizes))} --cores {' '.join(map(str, cores_list))}`",
            "",
            "The in-process shard worker with textured no-op images (bench/writers.py): read, copy, encode "
            "(imagemill's defaults: PNG level 6, JPEG/WebP q90, parameters embedded), write, metadata, "
            "commit. Cores: CPUs the process may run on (affinity), torch threads the same, 4 writer "
            "threads. Per core: images per CPU-second of the process (at the most cores), which "
            "other work on the machine does not change; it stretches the images/s columns and lowers "
            "the cores busy. S3: moto's server on loopback in another process, its CPU not counted.",
            "",
            "| size | format | to | images | "
            + " | ".join(f"images/s on {n} core{'s' * (n > 1)}" for n in cores_list)
            + f" | cores busy on {max(cores_list)} | images per CPU-second (per core) | cores for "
            + " / ".join(map(str, GPU_RATES))
            + " images/s |",
            "| --- | --- | --- | --- | " + "--- | " * len(cores_list) + "--- | --- | --- |",
            *rows_out,
            "",
        ]
    )
    publish(section)


def _row(
    size: int, image_format: str, place: str, images: int, rates: dict[int, float], per_core: float
) -> str:
    """One table row: wall-clock images/s per core count, then the per-core rate in CPU time."""
    needs = " / ".join(str(math.ceil(target / per_core)) for target in GPU_RATES)
    measured = " | ".join(f"{rate:.1f}" for rate in rates.values())
    busy = rates[max(rates)] / per_core
    cells = [f"{size}²", image_format, place, str(images), measured, f"{busy:.1f}", f"{per_core:.1f}", needs]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
