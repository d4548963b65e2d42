"""Device busy share: how much of an emulated GPU's time imagemill keeps busy, through Ray, per rate,
image size, format and place.

    python bench/device_busy.py                   # writes BENCHMARKS.md's "Device busy share" section
    python bench/device_busy.py --quick           # 512² at 30 images/s, PNG and JPEG, local: a look
    python bench/device_busy.py --in-process --no-s3   # no Ray (bench/gpu.sh's machine): the worker in
                                                        # this process, as imagemill.testing runs it

Each run is a whole job through Ray (`imagemill.run`, one worker, 4+ shards) of `model.kind: emulated`
(workers/generators/emulated.py): per denoising step the actor's model thread does
`--launch-ms` of GIL-holding Python work (kernel launches) and queues the step's device time, which a
device thread runs without the GIL; images are textured, so encoding costs what it does for generated
images. Rows = the rate × `--device-seconds`, so every run keeps the device busy for the same time,
except where this machine's cores cannot encode the rate (the table's last column): those are bounded
by the writers, not the device, so they get that share of the rows (at least 4 batches), which keeps
the whole table, 30 jobs, in about 10 minutes on a quiet 2-core machine.

Figures, from the committed shards' stats:
- busy share = device time (rows ÷ rate) ÷ the model window (first shard's model start to the last
  shard's model end): what a GPU at that rate would have been busy. 1.0 is the ceiling.
- launch not hidden = the batches' model seconds (each from the device reaching its first launch to its
  copy back done) − device time: the device waiting inside a batch for launches that fell behind.
- idle = the model held by a shard but waiting (on the shard's read, or on its writer queue while it
  had no batch queued).
- host = the model turn's time outside its batches on the device: the device waiting between batches
  for host work that the batch launched ahead did not hide (the worker's `host` stage: the turn's
  first launch and last hand-off, a hand-off longer than a batch), also as a share of the model's own
  time (the device-busy issue asks ≤ 2% at 7 images/s).
- gaps = the window − the seconds shards held the model: shard boundaries and hand-over.
- tail = the last shard's end − the model window's end: writes after the last batch (once per job).
A format and size whose encoding needs more cores than the machine has cannot reach 1.0: the table's
last column is the cores the writer-path table (bench/writers.py) says that rate needs
(imagemill.core.encode_rates, which the actor's start-up warning reads too).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from throughput import _machine, publish
from writers import _s3_endpoint

import imagemill
from imagemill.core.encode_rates import cores_to_encode
from imagemill.core.layout import OutputLayout
from imagemill.core.records import committed_shards

# (size, images/s): the rates real GPUs reach, as the device-busy issue lists them
RATES = ((512, 7), (512, 30), (512, 60), (1024, 2), (1024, 4))
FORMATS = ("png", "jpeg", "webp")
BATCH = {512: 16, 1024: 4}
STEPS = 20


def _input(folder: Path, rows: int, rows_per_shard: int) -> Path:
    path = folder / f"prompts-{rows}.parquet"
    table = pa.table(
        {"id": [f"r{i:06d}" for i in range(rows)], "prompt": [f"a photo {i}" for i in range(rows)]}
    )
    pq.write_table(table, path, row_group_size=rows_per_shard)
    return path


def _fresh_bucket(bucket: str, job: int) -> str:
    """A new bucket on the moto endpoint for one job. In one shared bucket, one full run's 16th job,
    512² 60/s JPEG to S3, lost 0.097 of the device between shards (its shards finished late), where
    the same job run alone lost 0.000-0.001 in three runs. The likely cause: moto lists a prefix by
    scanning every object of the bucket in Python, so each job's listings (the write gate's, the
    commit's) slowed with the objects the earlier jobs left; S3 lists by prefix server-side. A bucket
    per job measures what S3 would."""
    import s3fs

    fresh = f"{bucket.removeprefix('s3://')}-{job}"
    s3fs.S3FileSystem().mkdir(fresh)
    return f"s3://{fresh}"


def measure(
    scratch: Path,
    root: str,
    size: int,
    rate: float,
    image_format: str,
    device_seconds: float,
    launch_ms: float,
    in_process: bool,
) -> dict:
    """One job; its busy share and where the rest of the model window went."""
    batch = BATCH[size]
    # a rate the cores cannot encode runs at the writers' pace: as many rows as they encode in the time
    encodable = min(1.0, (os.cpu_count() or 1) / cores_to_encode(rate, image_format, size, size))
    rows = max(4 * batch, math.ceil(rate * device_seconds * encodable / batch) * batch)
    rows_per_shard = max(batch, rows // 4 // batch * batch)
    output = f"{root}/busy-{size}-{rate}-{image_format}-{time.monotonic_ns()}"
    spec = imagemill.build_spec(
        {
            "input": {"path": str(_input(scratch, rows, rows_per_shard)), "rows_per_shard": rows_per_shard},
            "output": {"path": output, "image_format": image_format},
            "model": {
                "kind": "emulated",
                "emulation": {"images_per_second": rate, "launch_ms_per_step": launch_ms},
            },
            "generation": {"width": size, "height": size, "num_inference_steps": STEPS},
            "workers": {"num_workers": 1, "batch_size": batch},
        }
    )
    if in_process:
        from imagemill.testing.in_process import run_in_process

        result = run_in_process(spec)
    else:
        result = imagemill.run(spec, progress=False)
    assert result.ok == rows, f"{result.ok} of {rows} rows written"
    stats = list(committed_shards(OutputLayout(output)).values())
    starts = [s.timeline["model"][0] for s in stats]
    ends = [s.timeline["model"][1] for s in stats]
    window = max(ends) - min(starts)
    device = rows / rate
    generate = sum(s.stage_seconds.get("denoise", 0.0) for s in stats)
    idle = sum(s.stage_seconds.get("idle", 0.0) for s in stats)
    host = sum(s.stage_seconds.get("host", 0.0) for s in stats)
    held = sum(end - start for start, end in zip(starts, ends, strict=True))
    finished = max(datetime.fromisoformat(s.finished_at).timestamp() for s in stats)
    return {
        "rows": rows,
        "busy": device / window,
        "launch": max(generate - device, 0.0) / window,
        "idle": idle / window,
        "host": host / window,
        "host_of_model": host / generate if generate else 0.0,
        "gaps": max(window - held, 0.0) / window,
        "tail": finished - max(ends),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512² at 30 images/s, PNG and JPEG, local only")
    parser.add_argument("--rates", help="size:images/s pairs, e.g. 512:7,1024:2 (default: every rate)")
    parser.add_argument("--formats", help="comma-separated, e.g. png,jpeg (default: png, jpeg, webp)")
    parser.add_argument("--device-seconds", type=float, default=10.0, help="device time per run")
    parser.add_argument("--launch-ms", type=float, default=2.0, help="GIL-held Python work per step")
    parser.add_argument("--no-s3", action="store_true", help="local output only")
    parser.add_argument("--in-process", action="store_true", help="no Ray: the worker in this process")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md")
    args = parser.parse_args()
    rates = ((512, 30),) if args.quick else RATES
    if args.rates:
        rates = tuple(tuple(int(n) for n in pair.split(":")) for pair in args.rates.split(","))
    formats = ("png", "jpeg") if args.quick else FORMATS
    if args.formats:
        formats = tuple(args.formats.split(","))
    load, began = os.getloadavg(), time.monotonic()
    s3 = not (args.quick or args.no_s3)
    rows = []
    with tempfile.TemporaryDirectory() as scratch, _s3_endpoint() if s3 else nullcontext(None) as bucket:
        if not args.in_process:  # after the endpoint: Ray's workers take the environment it sets
            import ray

            ray.init(
                num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False
            )  # room for Ray's tasks (#44687)
        places = {"local": f"{scratch}/out"} | ({"s3": bucket} if s3 else {})
        for size, rate in rates:
            for image_format in formats:
                for place, root in places.items():
                    figures = measure(
                        Path(scratch),
                        _fresh_bucket(root, len(rows)) if place == "s3" else root,
                        size,
                        rate,
                        image_format,
                        args.device_seconds,
                        args.launch_ms,
                        args.in_process,
                    )
                    need = cores_to_encode(rate, image_format, size, size)
                    rows.append((size, rate, image_format, place, figures, need))
                    print(f"{size}² {rate}/s {image_format} {place}: busy {figures['busy']:.3f}", flush=True)
    command = " ".join(["python bench/device_busy.py", *sys.argv[1:]])
    where = "in process (no Ray)" if args.in_process else "through Ray"
    cores = os.cpu_count() or 1
    short = sorted(
        {f"{fmt} at {size}² {rate}/s ({need})" for size, rate, fmt, _, _, need in rows if need > cores}
    )
    lines = [
        # in process: its own heading (the GPU machine's cores), never a prefix of the Ray table's
        f"## Device busy share in process, emulated accelerator, {_machine()}"
        if args.in_process
        else "## Device busy share, emulated accelerator",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {_machine()}, Python {platform.python_version()}; load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; the table took "
        f"{(time.monotonic() - began) / 60:.1f} min.",
        f"Reproduce: `{command}`",
        "",
        f"Settings: one worker {where}, {STEPS} steps, batch 16 at 512² and 4 at 1024², "
        f"{args.launch_ms:g} ms of GIL-held launch work per step, {args.device_seconds:g} s of device time "
        "per run, 4+ shards. Shares are of the model window (first shard's model start to last one's end).",
        "",
        f"What {cores} cores cannot encode (the cores it needs): {', '.join(short)}; those rows are "
        "bounded by the writers, and run with that share of the rows."
        if short
        else f"{cores} cores encode every rate here.",
        "",
        "| size | device images/s | format | to | rows | busy share | launch not hidden | idle | host "
        "(÷ model) | gaps | tail s | cores to encode |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {size}² | {rate} | {fmt} | {place} | {f['rows']} | **{f['busy']:.3f}** | {f['launch']:.3f} | "
            f"{f['idle']:.3f} | {f['host']:.3f} ({f['host_of_model']:.1%}) | {f['gaps']:.3f} | "
            f"{f['tail']:.1f} | {need} |"
            for size, rate, fmt, place, f, need in rows
        ),
        "",
    ]
    publish("\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
