"""`imagemill verify FOLDER` exits with its own status every time, never 134 (issue #24 item 7).

It sometimes aborted with `terminate called without an active exception`: `pq.read_table` on a job
output's Parquet files left read-ahead work on Arrow's thread pool that dropped buffers of Python
bytes after the call returned; one dropped while the interpreter exited took the GIL there, which ends
the thread through a C++ destructor. Measured before the fix: 5 aborts in 20 runs on a folder like
this one (its metadata Parquet files come last, as `metadata/` comes after `images/` and `data/`). The
command is run as a user runs it, in a fresh process each time.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

RUNS = 16  # at the rate measured before the fix, all 16 pass with odds under 1%
PAYLOAD = "imgmill"


def _webp(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "WEBP", quality=90)
    return buffer.getvalue()


@pytest.mark.cli
@pytest.mark.slow
def test_verify_on_a_folder_with_parquet_files_exits_with_its_status_every_time(tmp_path):
    (tmp_path / "a.webp").write_bytes(_webp(0))
    metadata = pa.table({"id": [f"r{i}" for i in range(2000)], "prompt": ["a prompt"] * 2000})
    for index in range(30):  # metadata Parquet: no image column, many row groups
        pq.write_table(metadata, tmp_path / f"m-{index:02d}.parquet", row_group_size=100)
    images = pa.table({"id": ["d0", "d1"], "image": [{"bytes": _webp(1), "path": None}] * 2})
    pq.write_table(images, tmp_path / "c-data.parquet")  # the parquet format's data file
    for _ in range(RUNS):
        done = run_cli("verify", str(tmp_path), timeout=120)
        assert done.returncode == 3, done.stderr  # nothing failed, nothing signed
        assert "terminate called" not in done.stderr
        assert done.stdout.strip().splitlines()[-1].startswith("3 images: 0 signed")
