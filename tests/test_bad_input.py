"""Bad input never sinks a job: each bad row is an error row with a reason, a bad file fails alone."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import read_metadata, run_cli

import imagemill
from imagemill.testing.in_process import run_in_process

SECRET = "sk-imagemill-test-secret-value"
HOSTILE_IDS = [
    "../../escape",
    "/etc/passwd",
    "with space",
    "bell\x07",
    "ünïcødé",
    "a/../../b",
    "..",
    "x" * 300,
]

# file name → (columns, expected outcome per id: "ok" or the error reason)
CASES: dict[str, tuple[dict, dict[str, str]]] = {
    "null_prompts": (
        {"id": ["null", "fine-1"], "prompt": [None, "a red circle"]},
        {"null": "invalid_prompt", "fine-1": "ok"},
    ),
    "empty_prompts": (
        {"id": ["empty", "spaces", "blank", "fine-2"], "prompt": ["", "   ", "\t\n", "a blue square"]},
        {"empty": "invalid_prompt", "spaces": "invalid_prompt", "blank": "invalid_prompt", "fine-2": "ok"},
    ),
    "numeric_prompts": (
        {"id": ["int-1", "int-2"], "prompt": pa.array([1, 2], pa.int64())},
        {"int-1": "invalid_prompt", "int-2": "invalid_prompt"},
    ),
    "long_prompts": (
        {"id": ["long", "short"], "prompt": ["red circle " * 200, "a short prompt"]},
        {"long": "ok", "short": "ok"},
    ),
    "bad_parameters": (
        {
            "id": ["steps-0", "steps-neg", "width-odd", "width-huge", "height-odd", "fine-3"],
            "prompt": ["a green star"] * 6,
            "num_inference_steps": [0, -2, None, None, None, None],
            "width": [None, None, 100, 100_000, None, 48],
            "height": [None, None, None, None, 36, None],
        },
        {
            "steps-0": "invalid_parameter",
            "steps-neg": "invalid_parameter",
            "width-odd": "invalid_parameter",
            "width-huge": "invalid_parameter",
            "height-odd": "invalid_parameter",
            "fine-3": "ok",
        },
    ),
    "repeated_ids": (
        {"id": ["same", "same", "other"], "prompt": ["first", "second", "third"]},
        {"same": "ok", "other": "ok"},  # the second "same" is checked below
    ),
    "hostile_ids": (
        {"id": HOSTILE_IDS, "prompt": ["a cat"] * len(HOSTILE_IDS)},
        dict.fromkeys(HOSTILE_IDS, "ok"),
    ),
}


def _write_input(folder) -> int:
    folder.mkdir()
    for name, (columns, _) in CASES.items():
        pq.write_table(pa.table(columns), folder / f"{name}.parquet")
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    return sum(len(columns["id"]) for columns, _ in CASES.values())


def test_bad_rows_and_files_are_reported_and_everything_else_is_generated(ray_address, tmp_path, tiny_model):
    rows = _write_input(tmp_path / "prompts")
    output = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts'}, storage_options: {{secret_token: {SECRET}}}}}\n"
        f"output: {{path: {output}, storage_options: {{secret_token: {SECRET}}}}}\n"
        f"model: {{source: {tiny_model}}}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 1}\n"
        "workers: {num_workers: 1, batch_size: 4}\n"
    )
    done = run_cli("run", str(job), "--no-progress", ray_address=ray_address)

    # The corrupt file fails as a unit, named; the job exits 1 and says how to retry.
    assert done.returncode == 1, done.stderr
    assert (
        f"FAILED shard corrupt-unreadable ({(tmp_path / 'prompts' / 'corrupt.parquet').as_uri()})"
        in done.stdout
    )
    assert "run the same command again" in done.stdout

    metadata = read_metadata(str(output)).to_pylist()
    assert len(metadata) == rows, "every readable input row has exactly one metadata row"
    outcome = {}
    for row in metadata:
        if row["id"] == "same" and row["prompt"] == "second":
            assert row["error"].startswith("duplicate_id:") and row["path"] is None
            continue
        assert row["id"] not in outcome, f"id {row['id']!r} has two metadata rows"
        outcome[row["id"]] = row["status"] if row["status"] == "ok" else row["error"].split(":", 1)[0]
    assert outcome == {key: value for _, expected in CASES.values() for key, value in expected.items()}

    by_id = {row["id"]: row for row in metadata if row["prompt"] != "second"}
    assert by_id["long"]["prompt_truncated"] and not by_id["short"]["prompt_truncated"]
    assert by_id["long"]["prompt"] == "red circle " * 200, "the metadata keeps the prompt as given"
    assert by_id["width-huge"]["width"] == 100_000 and "multiple of 8" in by_id["width-huge"]["error"]

    # Hostile ids: every image lies inside its shard folder, and nothing was written elsewhere.
    images = (output / "images").resolve()
    for row in metadata:
        if row["path"]:
            path = (output / row["path"]).resolve()
            assert path.parent.parent == images and path.is_file(), row["path"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out", "prompts"]
    expected = ["_job.json", "images", "metadata", "report.html", "report.json", "shards"]
    assert sorted(p.name for p in output.iterdir()) == expected

    # Accounting: input rows = ok + error rows, in the summary, the job record and `imagemill status`.
    ok = sum(1 for row in metadata if row["status"] == "ok")
    errors = rows - ok
    assert f"{rows} rows: {ok} ok, {errors} error" in done.stdout
    record = json.loads((output / "_job.json").read_text())
    assert (record["rows_total"], record["rows_ok"], record["rows_error"]) == (rows, ok, errors)
    assert record["errors_by_reason"] == {"invalid_prompt": 6, "invalid_parameter": 5, "duplicate_id": 1}
    status = run_cli("status", str(output))
    assert status.returncode == 1  # not complete: the corrupt file's shard failed
    assert f"rows:   {rows}/{rows} done: {ok} ok, {errors} error" in status.stdout
    assert "invalid_prompt: 6" in status.stdout and "failed shard corrupt-unreadable" in status.stdout

    # Storage options never appear in what imagemill prints or writes.
    written = [done.stdout, done.stderr, status.stdout]
    written += [
        p.read_bytes().decode("utf-8", "replace") for p in output.rglob("*") if p.suffix in (".json",)
    ]
    written += [json.dumps(metadata, default=str)]
    assert not any(SECRET in text for text in written)

    # The file is fixed; the same command finishes the job, redoing nothing else.
    os.remove(tmp_path / "prompts" / "corrupt.parquet")
    pq.write_table(
        pa.table({"id": ["late"], "prompt": ["a late prompt"]}), tmp_path / "prompts" / "corrupt.parquet"
    )
    again = run_in_process(imagemill.load_spec(job))  # the real driver
    assert again.complete and again.shards_run == 1, again.summary()
    assert (again.rows_total, again.ok, again.errors) == (rows + 1, ok + 1, errors)


def test_pickled_weights_are_refused_unless_the_user_opts_in(ray_address, tmp_path, tiny_model):
    from diffusers import DiffusionPipeline

    pickled = tmp_path / "pickled-model"
    DiffusionPipeline.from_pretrained(tiny_model).save_pretrained(pickled, safe_serialization=False)
    # diffusers writes its components as pickles here (transformers 5 writes safetensors regardless)
    assert list(pickled.glob("unet/*.bin")) and not list(pickled.glob("unet/*.safetensors"))
    pq.write_table(pa.table({"prompt": ["a red circle", "a blue star"]}), tmp_path / "prompts.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {{path: {tmp_path / 'prompts.parquet'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        f"model: {{source: {pickled}}}\n"
        "generation: {width: 32, height: 32, num_inference_steps: 1}\nworkers: {num_workers: 1}\n"
    )

    refused = run_cli("run", str(job), "--no-progress", ray_address=ray_address)
    assert refused.returncode == 2
    # Ray's own lines come too (its start-up, the actor's log); imagemill's verdict is one line.
    [verdict] = [line for line in refused.stderr.splitlines() if line.startswith("imagemill: error: ")]
    assert verdict.startswith(f"imagemill: error: workers could not load model {pickled}: "), verdict
    assert "no file named diffusion_pytorch_model.safetensors" in verdict
    assert "model.safetensors_only: false" in verdict, "the setting that allows them is named"

    # Allowed, the job runs (the real driver, its shards in process: the refusal above was the actor's).
    allowed = imagemill.load_spec(job, [("model.safetensors_only", False)])
    assert run_in_process(allowed).ok == 2
