"""The Ray actor: loads the model once, then turns shard after shard into images, metadata and stats.

Everything a shard produces is written from here straight to the output location; the driver gets
back only the shard's stats. The stats file is written last: its presence is the shard's commit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from imagemill.output import OutputLayout
from imagemill.shards import Shard
from imagemill.spec import IMAGE_EXTENSIONS, JobSpec
from imagemill.workers.diffusers_generator import DiffusersGenerator
from imagemill.workers.encoding import encode_image, thumbnail_data_uri
from imagemill.workers.model_source import resolve_model_source
from imagemill.workers.rows import Row, make_batches, prepare_rows, read_shard

WRITER_THREADS = 4
BATCHES_IN_FLIGHT = 2  # batches encoded/uploaded in the background while the next one generates
SAMPLES_PER_SHARD = 2  # thumbnails kept in the shard's stats, for the job report

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_truncated", pa.bool_()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("model", pa.string()),
        ("input_file", pa.string()),
        ("input_row", pa.int64()),
    ]
)


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _as(kind: type, value: Any) -> Any:
    """The value if it has the column's type, else null: invalid inputs are described in `error`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, int) and not -(2**63) <= value < 2**63:
        return None
    return value if isinstance(value, kind) else None


class ShardWorker:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.device = pick_device(spec.model.device)
        self.generator = DiffusersGenerator(
            resolve_model_source(spec.model), spec.model.dtype, self.device, spec.model.safetensors_only
        )
        self.output = OutputLayout(spec.output.path, spec.output.storage_options)
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="imagemill-writer")

    def ready(self) -> dict[str, Any]:
        return {"device": self.device, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    def _write_image(self, shard_id: str, row: Row, pixels: np.ndarray) -> tuple[str, str]:
        image_format = self.spec.output.image_format
        data = encode_image(pixels, image_format, self.spec.output.quality)
        path = OutputLayout.image_path(shard_id, row.row_id, IMAGE_EXTENSIONS[image_format])
        self.output.write_bytes(path, data)
        return path, hashlib.sha256(data).hexdigest()

    def process_shard(self, shard: Shard) -> dict[str, Any]:
        started = time.time()
        table = read_shard(shard, self.spec.input)
        rows = prepare_rows(table, shard, self.spec.input, self.spec.generation)
        read_seconds = time.time() - started
        self.output.prepare_shard(shard.shard_id)

        written: dict[int, tuple[str, str]] = {}
        pending: deque[list[tuple[Row, Future]]] = deque()

        def collect(batch: list[tuple[Row, Future]]) -> None:
            for row, future in batch:
                written[row.index] = future.result()

        generate_seconds = 0.0
        truncated: set[int] = set()
        samples: list[dict[str, Any]] = []
        for batch in make_batches(rows, self.spec.workers.batch_size):
            tick = time.time()
            prompts = [row.prompt for row in batch]
            truncated.update(
                row.index for row, cut in zip(batch, self.generator.truncated(prompts), strict=True) if cut
            )
            try:
                pixels = self.generator.generate(
                    prompts, [row.negative_prompt for row in batch], [row.seed for row in batch], batch[0].key
                )
            except ValueError as exc:  # the pipeline's own checks refused these parameters
                for row in batch:
                    row.error = f"model_rejected: {exc}"
                continue
            finally:
                generate_seconds += time.time() - tick
            for row, image in zip(batch[: SAMPLES_PER_SHARD - len(samples)], pixels, strict=False):
                samples.append(
                    {
                        "id": row.row_id,
                        "prompt": row.prompt,
                        "seed": row.seed,
                        "thumbnail": thumbnail_data_uri(image),
                    }
                )
            pending.append(
                [
                    (row, self.writers.submit(self._write_image, shard.shard_id, row, pixels[i]))
                    for i, row in enumerate(batch)
                ]
            )
            if len(pending) > BATCHES_IN_FLIGHT:
                collect(pending.popleft())
        tick = time.time()
        while pending:
            collect(pending.popleft())
        drain_seconds = time.time() - tick

        self._write_metadata(shard, rows, written, truncated)
        errors = Counter(row.error.split(":", 1)[0] for row in rows if row.error)
        seconds = time.time() - started
        stats = {
            "shard_id": shard.shard_id,
            "input_file": shard.file_url,
            "rows": len(rows),
            "ok": len(written),
            "error": len(rows) - len(written),
            "errors_by_reason": dict(errors),
            "finished_at": datetime.now(UTC).isoformat(),
            "seconds": round(seconds, 3),
            "read_seconds": round(read_seconds, 3),
            "generate_seconds": round(generate_seconds, 3),
            "write_wait_seconds": round(drain_seconds, 3),
            "images_per_second": round(len(written) / seconds, 3) if seconds else 0.0,
            "device": self.device,
            "samples": samples,
        }
        self.output.write_json(OutputLayout.stats_path(shard.shard_id), stats)
        return stats

    def _write_metadata(
        self, shard: Shard, rows: list[Row], written: dict[int, tuple[str, str]], truncated: set[int]
    ) -> None:
        records = []
        for row in rows:
            path, sha256 = written.get(row.index, (None, None))
            records.append(
                {
                    "id": row.row_id,
                    "prompt": row.prompt if row.prompt is None else str(row.prompt),
                    "prompt_truncated": row.index in truncated,
                    "negative_prompt": _as(str, row.negative_prompt),
                    "seed": _as(int, row.seed),
                    "num_inference_steps": _as(int, row.num_inference_steps),
                    "guidance_scale": _as(float, row.guidance_scale),
                    "width": _as(int, row.width),
                    "height": _as(int, row.height),
                    "status": "ok" if path else "error",
                    "error": row.error,
                    "path": path,
                    "sha256": sha256,
                    "model": self.spec.model.source,
                    "input_file": shard.file_url,
                    "input_row": row.input_row,
                }
            )
        table = pa.Table.from_pylist(records, schema=METADATA_SCHEMA)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        self.output.write_bytes(OutputLayout.metadata_path(shard.shard_id), buffer.getvalue().to_pybytes())
