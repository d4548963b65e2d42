"""Memory stays flat as the input grows: the no-op generator (no model) on 100k and 1M rows.

    python bench/memory.py                      # 100,000 and 1,000,000 rows; writes BENCHMARKS.md
    python bench/memory.py --rows 10000 50000   # any sizes
    python bench/memory.py --one-row-group --rows 1000000   # one file of one row group, 1,000-row shards

The driver holds shard descriptors and per-shard stats only, and an actor one shard at a time, so
their peak resident memory should not grow with the row count. Each run is a fresh driver process
(its peak RSS from getrusage); each actor reports its own peak RSS in its shard stats.

`--one-row-group` writes the rows as one file of one row group (as pandas' to_parquet does), cut into
pieces of 1,000 rows, and reads the input through a filesystem that counts the bytes every process
reads (bench/counting_fs.py): the whole job should read the prompt column once (the piece server),
and the driver only the footer.
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
from throughput import publish

ROWS_PER_FILE = 100_000
BENCH = Path(__file__).resolve().parent
DRIVER = """
import json, os, resource, sys, time
import ray
import imagemill
from imagemill.core.layout import OutputLayout
from imagemill.core.records import committed_shards
log = os.environ.get("COUNTING_FS_LOG")
if log:  # count the bytes read from the input in every process (bench/counting_fs.py)
    sys.path.insert(0, sys.argv[2])
    import counting_fs
    counting_fs.register()
    env = {"PYTHONPATH": sys.argv[2], "COUNTING_FS_LOG": log}
    ray.init(runtime_env={"worker_process_setup_hook": "counting_fs.register", "env_vars": env})
spec = imagemill.build_spec(json.loads(sys.argv[1]))
started = time.perf_counter()
result = imagemill.run(spec, progress=False)
seconds = time.perf_counter() - started
stats = committed_shards(OutputLayout(spec.output.path)).values()
read = counting_fs.bytes_read(log) if log else {}
print(json.dumps({
    "ok": result.ok, "rows": result.rows_total, "shards": result.shards_total, "seconds": seconds,
    "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "actor_peak_rss_mb": max(s.peak_rss_mb for s in stats),
    "bytes_read": sum(read.values()), "driver_bytes_read": read.get(os.getpid(), 0),
}))
"""


def write_input(folder: Path, rows: int, one_row_group: bool) -> int:
    """The prompts, in files of ROWS_PER_FILE rows in row groups of 10,000, or in one file of one
    row group; returns the size of the prompt column's chunks (the columns the job uses)."""
    folder.mkdir(parents=True)
    per_file = rows if one_row_group else ROWS_PER_FILE
    column_bytes = 0
    for start in range(0, rows, per_file):
        count = min(per_file, rows - start)
        prompts = pa.array([f"a solid colour number {i}" for i in range(start, start + count)])
        path = folder / f"part-{start // per_file:04d}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=count if one_row_group else 10_000)
        metadata = pq.ParquetFile(path).metadata
        for index in range(metadata.num_row_groups):
            column_bytes += metadata.row_group(index).column(0).total_compressed_size
    return column_bytes


def measure(rows: int, work: Path, one_row_group: bool = False) -> dict:
    column_bytes = write_input(work / "prompts", rows, one_row_group)
    env = dict(os.environ)
    if one_row_group:
        env["COUNTING_FS_LOG"] = str(work / "bytes-read.log")
    spec = {
        "name": f"memory-{rows}",
        "input": {
            "path": f"counting://{work / 'prompts'}" if one_row_group else str(work / "prompts"),
            "rows_per_shard": 1_000 if one_row_group else 10_000,
        },
        "output": {
            "path": str(work / "out"),
            "format": "webdataset",
        },  # 1M loose files would measure the disk
        "model": {"kind": "noop"},
        "generation": {"width": 8, "height": 8},
        "workers": {"num_workers": 2, "batch_size": 256},
    }
    command = [sys.executable, "-c", DRIVER, json.dumps(spec), str(BENCH)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "column_bytes": column_bytes}


def one_row_group_section(results: list[dict], command: str) -> str:
    return "\n".join(
        [
            "## One row group cut into pieces, no-op generator",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPU cores. Reproduce: `{command}`",
            "",
            "One file of one row group (as pandas' `to_parquet` writes), `rows_per_shard: 1000`, 2 actors,"
            " 8×8 PNG in WebDataset tars, no model. Bytes read: every read of the input file by every"
            " process (driver, actors, piece server), counted by `bench/counting_fs.py`; the prompt"
            " column is the only column the job uses.",
            "",
            "| rows | shards | ok | seconds | driver peak RSS (MB) | largest actor peak RSS (MB) "
            "| prompt column (MB) | bytes read, job (MB) | ÷ column | bytes read, driver (KB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {r['rows']:,} | {r['shards']:,} | {r['ok']:,} | {r['seconds']:.0f} "
                f"| {r['driver_peak_rss_mb']:.0f} | {r['actor_peak_rss_mb']:.0f} "
                f"| {r['column_bytes'] / 2**20:.2f} | {r['bytes_read'] / 2**20:.2f} "
                f"| {r['bytes_read'] / r['column_bytes']:.3f} | {r['driver_bytes_read'] / 2**10:.0f} |"
                for r in results
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--one-row-group", action="store_true", help="one file of one row group, cut")
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
            started = time.perf_counter()
            results.append(measure(rows, Path(work), args.one_row_group))
            print(
                f"{rows} rows: {results[-1]} ({time.perf_counter() - started:.0f} s with input)", flush=True
            )
    command = "python bench/memory.py --rows " + " ".join(map(str, args.rows))
    if args.one_row_group:
        section = one_row_group_section(results, command + " --one-row-group")
        publish(section)
        return
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
    publish(section)


if __name__ == "__main__":
    main()
