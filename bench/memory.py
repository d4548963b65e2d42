"""Memory stays flat as the input grows: the no-op generator (no model) on 100k and 1M rows.

    python bench/memory.py                      # 100,000 and 1,000,000 rows; writes BENCHMARKS.md
    python bench/memory.py --rows 10000 50000   # any sizes

The driver holds shard descriptors and per-shard stats only, and an actor one shard at a time, so
their peak resident memory should not grow with the row count. Each run is a fresh driver process
(its peak RSS from getrusage); each actor reports its own peak RSS in its shard stats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from throughput import write_benchmarks

ROWS_PER_FILE = 100_000
DRIVER = """
import json, resource, sys, time
import imagemill
from imagemill.output import OutputLayout
from imagemill.records import committed_shards
spec = imagemill.build_spec(json.loads(sys.argv[1]))
started = time.perf_counter()
result = imagemill.run(spec, progress=False)
seconds = time.perf_counter() - started
stats = committed_shards(OutputLayout(spec.output.path)).values()
print(json.dumps({
    "ok": result.ok, "rows": result.rows_total, "seconds": seconds,
    "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "actor_peak_rss_mb": max(s.peak_rss_mb for s in stats),
}))
"""


def write_input(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    for start in range(0, rows, ROWS_PER_FILE):
        count = min(ROWS_PER_FILE, rows - start)
        prompts = pa.array([f"a solid colour number {i}" for i in range(start, start + count)])
        pq.write_table(pa.table({"prompt": prompts}), folder / f"part-{start // ROWS_PER_FILE:04d}.parquet",
                       row_group_size=10_000)  # fmt: skip


def measure(rows: int, work: Path) -> dict:
    write_input(work / "prompts", rows)
    spec = {
        "name": f"memory-{rows}",
        "input": {"path": str(work / "prompts"), "rows_per_shard": 10_000},
        "output": {
            "path": str(work / "out"),
            "format": "webdataset",
        },  # 1M loose files would measure the disk
        "model": {"kind": "noop"},
        "generation": {"width": 8, "height": 8},
        "workers": {"num_workers": 2, "batch_size": 256},
    }
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
            started = time.perf_counter()
            results.append(measure(rows, Path(work)))
            print(
                f"{rows} rows: {results[-1]} ({time.perf_counter() - started:.0f} s with input)", flush=True
            )
    command = "python bench/memory.py --rows " + " ".join(map(str, args.rows))
    section = "\n".join(
        [
            "## Memory, no-op generator",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPU cores. Reproduce: `{command}`",
            "",
            "2 actors, shards of 10,000 rows, 8×8 PNG in WebDataset tars, no model (`model.kind: noop`).",
            "",
            "| rows | ok | seconds | rows/s | driver peak RSS (MB) | largest actor peak RSS (MB) |",
            "| --- | --- | --- | --- | --- | --- |",
            *(
                f"| {r['rows']:,} | {r['ok']:,} | {r['seconds']:.0f} | {r['ok'] / r['seconds']:,.0f} "
                f"| {r['driver_peak_rss_mb']:.0f} | {r['actor_peak_rss_mb']:.0f} |"
                for r in results
            ),
            "",
        ]
    )
    print(section)
    write_benchmarks(section)


if __name__ == "__main__":
    main()
