"""A model directory on S3 is downloaded once per node, however many actors load it there.

The model is read through S3FaultProxy (no faults), which counts every request by path: each actor
lists the model's files (its cache key), and only the first actor on a node downloads them.
"""

from __future__ import annotations

import fsspec
import pytest
import yaml
from conftest import OBJECT_STORE_BYTES, isolated_cluster, make_bucket, run_cli, write_prompt_files

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.testing.s3_fault_proxy import S3FaultProxy
from imagemill.workers.worker import make_generator

GENERATION = {"width": 32, "height": 32, "num_inference_steps": 1}


def _put_model(tiny_model: str, bucket: str) -> tuple[str, list[str]]:
    """Upload the model; returns its URL and the request paths of its weight files."""
    fs = fsspec.filesystem("s3")
    fs.put(tiny_model, f"{bucket[5:]}/models/tiny", recursive=True)
    weights = [f"/{name}" for name in fs.find(f"{bucket[5:]}/models/tiny") if name.endswith(".safetensors")]
    assert len(weights) == 3
    return f"{bucket}/models/tiny", weights


def _counts(proxy: S3FaultProxy, bucket: str, weights: list[str]) -> tuple[dict[str, int], int]:
    """GETs of each weight file, and listings of the model directory (one per actor that loaded it)."""
    gets = {path: proxy.by_path[("GET", path)] for path in weights}
    listings = sum(
        count
        for (method, path), count in proxy.by_path.items()
        if method == "GET" and path.startswith(f"/{bucket[5:]}?") and "prefix=models/tiny" in path
    )
    return gets, listings


def _spec(model_url: str, proxy: S3FaultProxy, tmp_path, workers: int) -> dict:
    return {
        "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 4},
        "output": {"path": str(tmp_path / "out")},
        "model": {"source": model_url, "storage_options": {"endpoint_url": proxy.url}},
        "generation": GENERATION,
        "workers": {"num_workers": workers, "batch_size": 4},
    }


def test_model_is_downloaded_once_per_node_with_two_actors_on_each(
    monkeypatch, s3_endpoint, tiny_model, tmp_path
):
    """Two nodes of two actors: four actors resolve the model, two downloads (one per node) happen."""
    bucket = make_bucket("fetch-two-nodes")
    model_url, weights = _put_model(tiny_model, bucket)
    # Work starts with the first ready actor and the job's end stops the rest: the job must outlast
    # the slowest actor's load (32 shards: seconds for two actors alone).
    rows = write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=128, row_group_size=4)
    with isolated_cluster(monkeypatch) as cluster, S3FaultProxy(s3_endpoint) as proxy:
        for node in ("node-a", "node-b"):  # each node its own model cache, as separate machines have
            cache = {"IMAGEMILL_CACHE_DIR": str(tmp_path / node)}
            cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES, env_vars=cache)
        spec_file = tmp_path / "job.yaml"
        spec_file.write_text(yaml.safe_dump(_spec(model_url, proxy, tmp_path, workers=4)))
        done = run_cli("run", str(spec_file), "--no-progress", ray_address=cluster.address)
        gets, listings = _counts(proxy, bucket, weights)
    assert done.returncode == 0, done.stderr
    assert f"{rows} rows: {rows} ok" in done.stdout
    assert "(4 of 4)" in done.stderr, f"an actor was still loading when the job ended: {done.stderr}"
    assert listings == 4, "each of the four actors resolves the model"
    assert gets == dict.fromkeys(weights, 2), "the weights are downloaded once on each node"
    assert all(list((tmp_path / node).glob("models/*/unet/*.safetensors")) for node in ("node-a", "node-b"))


@pytest.mark.parametrize(
    "bad_key",
    [
        "models/m/../../../../escaped-by-dots.txt",  # four levels up from the staging folder
        "models/m/{absolute}",  # a double slash: the rest of the key is an absolute path
    ],
)
def test_model_keys_that_leave_the_cache_are_refused_and_nothing_is_written(
    monkeypatch, s3_endpoint, tmp_path, bad_key
):
    """A bucket may hold keys with `..` parts or a double slash (S3 stores them literally); copied by
    string slicing they land outside the node's cache. The load is refused in one line naming the URL
    and the key, before any file is copied. Every pretrained source (model, LoRA, scorer, expander,
    tiny VAE) is fetched by this one function, through workers/loading.py (tests/test_loading.py)."""
    import boto3

    cache = tmp_path / "node" / "cache"  # the staging folder is cache/models/<key>.partial
    monkeypatch.setenv("IMAGEMILL_CACHE_DIR", str(cache))
    outside = tmp_path / "escaped-by-slash.txt"
    key = bad_key.format(absolute=str(outside))  # models/m//tmp/.../escaped-by-slash.txt
    bucket = make_bucket(f"fetch-bad-key-{'dots' if '..' in key else 'slash'}")
    client = boto3.client("s3")
    client.put_object(Bucket=bucket[5:], Key="models/m/model_index.json", Body=b"{}")
    client.put_object(Bucket=bucket[5:], Key=key, Body=b"not a model file")
    stored = [item["Key"] for item in client.list_objects_v2(Bucket=bucket[5:])["Contents"]]
    assert key in stored, "moto keeps the key as it was written"

    spec = imagemill.build_spec(
        {
            "input": {"path": str(tmp_path)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": f"{bucket}/models/m"},
        }
    )
    with pytest.raises(ImagemillError) as refused:
        make_generator(spec, "cpu")
    message = str(refused.value)
    assert "\n" not in message and f"{bucket}/models/m" in message and key in message
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written == [], "nothing is copied, inside the cache or out of it"
