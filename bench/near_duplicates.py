"""Near-duplicate detection's cost and the driver's memory as the job grows
(imagemill.evaluation.near_duplicates).

    python bench/near_duplicates.py                         # 2,500, 5,000 and 10,000 images; BENCHMARKS.md
    python bench/near_duplicates.py --images 10000 40000    # any sizes
    python bench/near_duplicates.py --method faiss          # the faiss index (a CPU driver's large jobs)

For each size it writes embedding files as actors do (768-d CLIP-L-sized float16 embeddings, 250 per
shard, random directions, with 1% of the images planted as copies of another image plus noise far
below the threshold), then runs the post-pass in a fresh process and records its peak RSS (getrusage),
the RSS before the pass (imports done), the seconds taken, and whether exactly the planted pairs were
found. The pass is exact (every pair is compared), so its cost per 1k images grows with the job; the
driver's memory should not (one block of 4,096 rows, one shard, their similarities).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from throughput import write_benchmarks

DIM = 768
PER_SHARD = 250
PLANTED_SHARE = 0.01
THRESHOLD = 0.98
CHILD = """
import json, resource, sys, time
from imagemill.evaluation.near_duplicates import find_duplicates
from imagemill.core.layout import OutputLayout
output, shards = OutputLayout(sys.argv[1]), json.loads(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
table = find_duplicates(output, shards, float(sys.argv[3]), sys.argv[4])
seconds = time.perf_counter() - start
pairs = sorted(tuple(sorted((row["id"], row["nearest"]))) for row in table.to_pylist())
print(json.dumps({"seconds": seconds, "rss_before_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "pairs": sorted(set(pairs))}))
"""


def write_job(root: Path, images: int, seed: int = 0) -> tuple[list[str], set[tuple[str, str]]]:
    """Embedding files of `images` rows; returns the shard ids and the planted (original, copy) pairs."""
    from imagemill.core.features import embeddings_table
    from imagemill.core.layout import OutputLayout, parquet_bytes
    from imagemill.core.write_gate import OwnedOutput

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((images, DIM)).astype(np.float32)
    ids = [f"img-{i:07d}" for i in range(images)]
    copies = rng.choice(np.arange(1, images), size=int(images * PLANTED_SHARE), replace=False)
    planted = set()
    for copy in copies:
        original = int(rng.integers(0, copy))
        if original in copies:  # keep the planted pairs disjoint: one copy per original
            continue
        vectors[copy] = vectors[original] + 0.01 * rng.standard_normal(DIM)
        planted.add(tuple(sorted((ids[original], ids[copy]))))
    output = OutputLayout(str(root))
    owned = OwnedOutput.unleased(output)  # a planted output, written outside any run
    shard_ids = []
    for start in range(0, images, PER_SHARD):
        shard_id = f"shard-{start // PER_SHARD:05d}"
        rows = slice(start, start + PER_SHARD)
        table = embeddings_table(ids[rows], [None] * len(ids[rows]), vectors[rows])
        owned.write_whole(OutputLayout.embeddings_path(shard_id), parquet_bytes(table))
        shard_ids.append(shard_id)
    return shard_ids, planted


def measure(images: int, method: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        shard_ids, planted = write_job(Path(folder), images)
        result = subprocess.run(
            [sys.executable, "-c", CHILD, folder, json.dumps(shard_ids), str(THRESHOLD), method],
            capture_output=True,
            text=True,
            check=True,
        )
    found = json.loads(result.stdout.splitlines()[-1])
    pairs = {tuple(pair) for pair in found.pop("pairs")}
    return {"images": images, **found, "planted": len(planted), "exact": pairs == planted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--method", choices=["torch", "faiss"], default="torch")
    args = parser.parse_args()
    rows = [measure(images, args.method) for images in args.images]
    # imported after measuring: a child's peak RSS starts from this process's (it carries across exec)
    from imagemill.evaluation.similarity_search import FAISS_MIN_IMAGES

    table = "\n".join(
        f"| {r['images']:,} | {r['planted']} | {'yes' if r['exact'] else 'NO'} | {r['seconds']:.2f} | "
        f"{1000 * r['seconds'] / r['images']:.3f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        for r in rows
    )
    command = (
        f"python bench/near_duplicates.py --images {' '.join(map(str, args.images))} --method {args.method}"
    )
    way = {
        "torch": "Exact blockwise cosine (torch on the CPU)",
        "faiss": "An exact faiss index (IndexFlatIP, range search; what a CPU driver uses from "
        f"{FAISS_MIN_IMAGES:,} images)",
    }[args.method]
    write_benchmarks(
        f"""## Near-duplicates, cpu{", faiss index" if args.method == "faiss" else ""}

Measured {datetime.now(UTC):%Y-%m-%d} on {platform.processor() or platform.machine()}, no GPU, Python \
{platform.python_version()}. Reproduce: `{command}`

{way} over {DIM}-d float16 embedding files of {PER_SHARD} images each,
threshold {THRESHOLD}; 1% of the images planted as noisy copies. RSS in MB of the driver process running
the pass (before: after imports; peak: the process's maximum).

| images | planted pairs | found exactly those | seconds | seconds per 1k images | RSS before | peak RSS |
| --- | --- | --- | --- | --- | --- | --- |
{table}
"""
    )
    print(table)


if __name__ == "__main__":
    main()
