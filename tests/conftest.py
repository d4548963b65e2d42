"""Shared fixtures: a real S3 endpoint on loopback, a local Ray, the tiny model, prompt Parquet files;
and the suite's tiers (`pytest_collection_modifyitems`).

The environment is set before Ray starts, so Ray's worker processes inherit it: HF_HUB_OFFLINE=1 (no
hub here), the AWS variables pointing s3fs at the moto server, a node cache in a temp folder, and short
storage retry backoffs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("IMAGEMILL_CACHE_DIR", tempfile.mkdtemp(prefix="imagemill-cache-"))
# Storage retries back off from 0.05 s, not 0.5 s: the fault tests' retries need not wait (set before
# Ray starts, so the actors see it too).
os.environ.setdefault("IMAGEMILL_STORAGE_BACKOFF", "0.05")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from PIL import Image  # noqa: E402

# --- tiers ---------------------------------------------------------------------------------------
# Each test is marked from what it uses: a fixture named here gives its marker (fixtures it depends
# on count: `ray_address` needs `ray_session`); a test that starts one of these without a fixture
# (`imagemill.run` on Ray, `run_cli`, `isolated_cluster`) carries the marker itself, and the fast
# tier fails it if it does not (`pytest_runtest_call`). `fast`: none of them, nor `slow` (over ~3 s
# on its own); `pytest -m fast` is the developer's tier, the whole suite CI's.
FIXTURE_TIERS = {
    "ray_session": "ray",
    "ray_address": "ray",
    "_head": "cluster",  # tests/test_cluster_jobs.py: `ray start --head`
    "two_cpus": "cluster",  # tests/test_placement.py: an isolated_cluster
    "s3_endpoint": "s3",
    "tiny_model": "model",
    "tiny_clip": "model",
}
# The markers other than `fast`, registered with their meaning in pyproject.toml.
TIERS = ("ray", "cluster", "cli", "model", "s3", "slow")
FAST = "fast"


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for fixture in item.fixturenames:
            if fixture in FIXTURE_TIERS:
                item.add_marker(FIXTURE_TIERS[fixture])
        if item.get_closest_marker("cluster"):
            item.add_marker("ray")
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(FAST)


_started: dict[str, int] = {"cli": 0, "cluster": 0}  # run_cli and isolated_cluster count their uses


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test in the fast tier that starts Ray, a cluster or the CLI fails, naming the marker it needs:
    the tier stays fast without anyone keeping a list."""
    ray_before = _ray_running()
    started = dict(_started)
    result = yield
    if item.get_closest_marker(FAST):
        used = [tier for tier, count in _started.items() if count != started[tier]]
        used += ["ray"] if _ray_running() and not ray_before else []
        if used:
            marks = ", ".join(f"@pytest.mark.{tier}" for tier in used)
            pytest.fail(f"{item.nodeid} is in the fast tier but starts {'/'.join(used)}: mark it {marks}")
    return result


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# No per-example deadline: the machines tests share are loaded, and a slow example is not a wrong one.
settings.register_profile("imagemill", deadline=None)
settings.load_profile("imagemill")

WORDS = ["red", "blue", "green", "small", "large", "cat", "dog", "house", "tree", "boat", "circle", "star"]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1, found by s3fs through the standard AWS environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    # "local": a new instance, never a cluster another process started here (`ray start`, a bench)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


OBJECT_STORE_BYTES = 100 * 1024 * 1024


@contextlib.contextmanager
def isolated_cluster(monkeypatch):
    """A `ray.cluster_utils.Cluster` (a head taking no actors; add nodes to it) that this process
    does not join: drivers reach it as subprocesses with RAY_ADDRESS=cluster.address.

    It must not become the machine's "current" Ray (/tmp/ray/ray_current_cluster), which a plain
    ray.init() elsewhere would then join, and it must leave this process's link to the session Ray
    alone: each node it starts points the process-wide GCS client at itself, and once its GCS is gone
    a process still holding that client exits within 60 s.
    """
    import ray._common.utils
    import ray._private.utils
    import ray.experimental.internal_kv as internal_kv
    from ray.cluster_utils import Cluster

    _started["cluster"] += 1
    initialize = internal_kv._initialize_internal_kv
    previous = internal_kv.global_gcs_client  # the session's, or None: put back on the way out

    def keep_the_session_client(gcs_client) -> None:
        if previous is None:
            initialize(gcs_client)

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(internal_kv, "_internal_kv_reset", lambda: None)
    monkeypatch.setattr(internal_kv, "_initialize_internal_kv", keep_the_session_client)
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()
        # A later cluster or session must not inherit this one's client, dead with its GCS.
        internal_kv.global_gcs_client = previous
        internal_kv._initialized = previous is not None


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session cluster's address, for drivers started as subprocesses (RAY_ADDRESS=...)."""
    return ray_session.get_runtime_context().gcs_address


def run_cli(*args: str, ray_address: str = "", cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`imagemill ARGS` in a subprocess; with ray_address it joins that cluster instead of starting one."""
    _started["cli"] += 1
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run(
        [sys.executable, "-m", "imagemill.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from imagemill.testing.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIPModel (imagemill.testing.tiny_model.make_tiny_clip): scoring, safety, evaluation."""
    from imagemill.testing.tiny_model import make_tiny_clip

    return str(make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip"))


def make_bucket(name: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return f"s3://{name}"


def prompt_table(n_rows: int, start: int = 0, with_ids: bool = True) -> pa.Table:
    prompts = [
        " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 7)) + f" {i}"
        for i in range(start, start + n_rows)
    ]
    columns = {"prompt": prompts}
    if with_ids:
        columns = {"id": [f"row-{i:05d}" for i in range(start, start + n_rows)], **columns}
    return pa.table(columns)


def write_prompt_files(
    url: str, n_files: int, rows_per_file: int, row_group_size: int, with_ids: bool = True
) -> int:
    """Write n_files Parquet files of prompts under `url` (local or s3://); returns the row count."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for index in range(n_files):
        table = prompt_table(rows_per_file, start=index * rows_per_file, with_ids=with_ids)
        with fs.open(f"{root}/part-{index:03d}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
    return n_files * rows_per_file


def read_metadata(url: str) -> pa.Table:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    files = sorted(fs.glob(f"{root}/metadata/*.parquet"))
    return pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])


def as_pixels(images) -> np.ndarray:
    """A pipeline's `output_type="pt"` images as (N, H, W, 3) uint8, the way imagemill converts them."""
    import torch

    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def check_output(url: str, expected_ids: set[str], width: int, height: int) -> dict[str, str]:
    """The foundation's end-to-end check; returns {id: sha256} of the images.

    Every input id has exactly one metadata row, done (ok, or filtered by the CLIP score);
    every row with a path has its image, which decodes and has the stated size and sha256; a filtered
    row without one (scoring.on_low_score: drop) has no sha256; no image exists that no row names.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    metadata = read_metadata(url).to_pylist()
    ids = [row["id"] for row in metadata]
    assert len(ids) == len(set(ids)), "an id has more than one metadata row"
    assert set(ids) == expected_ids
    hashes = {}
    for row in metadata:
        assert row["status"] in ("ok", "filtered"), row
        if row["path"] is None:  # dropped for its score: no image
            assert row["status"] == "filtered" and row["sha256"] is None, row
            continue
        data = fs.cat_file(f"{root}/{row['path']}")
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size == (row["width"], row["height"]) == (width, height)
        hashes[row["id"]] = row["sha256"]
    images = {path[len(root) + 1 :] for path in fs.find(f"{root}/images")}
    assert images == {row["path"] for row in metadata if row["path"]}, "an image that no row names"
    assert fs.exists(f"{root}/_SUCCESS")
    return hashes


def merged_feature_sums(output, committed: dict) -> dict:
    """The job's feature sums per label, as the post-pass's FID metric merges them from the shards."""
    from imagemill.evaluation.feature_metrics import FrechetDistance
    from imagemill.evaluation.metric import merge_over, read_shards

    finished = {shard_id: stats.finished_at for shard_id, stats in committed.items()}
    return merge_over([FrechetDistance(None)], read_shards(output, finished))[0].sums
