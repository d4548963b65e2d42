"""The write gate (imagemill.core.write_gate): a run that lost its output's lease writes nothing more,
a committed shard's files are never replaced by another run's bytes, and no code writes into an
output any other way."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_bucket, run_cli, write_prompt_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagemill.core.errors import ImagemillError
from imagemill.core.layout import LEASE_FILE, OutputLayout
from imagemill.core.lease import TIMEOUT_ENV
from imagemill.core.write_gate import LeaseLost, OwnedOutput, ShardConflict

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0  # the lease timeout of the paused driver, seconds

JOB = """\
name: gate-test
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{kind: noop}}
generation: {{width: 32, height: 32, num_inference_steps: 1, guidance_scale: 3.0}}
workers: {{num_workers: 1, batch_size: 4}}
"""


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lease file aside: the live run's heartbeat), by path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LEASE_FILE
    }


def _commits(output: Path) -> int:
    return len(list((output / "shards").glob("*.json")))


def test_a_driver_paused_past_its_lease_writes_nothing_once_another_run_took_over(
    ray_address, tmp_path, monkeypatch
):
    """Driver A is SIGSTOPped past the lease timeout; B takes the output over with `--overwrite` and
    another seed and finishes; A resumes: it stops at once, in one line naming the output and B's run,
    exit 2, and not one byte of the output changes."""
    monkeypatch.setenv(TIMEOUT_ENV, str(TIMEOUT))  # both drivers inherit it
    write_prompt_files(str(tmp_path / "prompts"), n_files=4, rows_per_file=48, row_group_size=4)
    shards = 4 * 48 // 4
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(input=tmp_path / "prompts", output=out))
    log = (tmp_path / "a.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "imagemill.cli", "run", str(job), "--no-progress"],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.time() + 180
        while _commits(out) < 2:
            assert driver.poll() is None and time.time() < deadline, "driver A ended or stalled"
            time.sleep(0.05)
        driver.send_signal(signal.SIGSTOP)
        assert _commits(out) < shards - 4, "driver A did every shard before the pause: lengthen the job"
        time.sleep(TIMEOUT + 1)  # A's heartbeat is stale now; its actors have finished what they held

        taken = run_cli("run", str(job), "--no-progress", "--overwrite", "--set", "generation.seed=7",
                        ray_address=ray_address)  # fmt: skip
        assert taken.returncode == 0, taken.stderr
        assert (out / "_SUCCESS").exists() and _commits(out) == shards
        run_b = json.loads((out / "_job.json").read_text())["run_id"]
        before = _tree(out)

        driver.send_signal(signal.SIGCONT)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGCONT)
            driver.kill()
            driver.wait()
    errors = [
        line for line in (tmp_path / "a.log").read_text().splitlines() if line.startswith("imagemill: ")
    ]
    assert _tree(out) == before  # B's files, byte for byte: nothing of A's is visible
    assert code == 2
    assert len(errors) == 1, errors
    assert f"lost {out} to run {run_b} " in errors[0], errors[0]  # B has ended: its job record names it
    assert not (out / "_staging").exists()


def test_an_attempt_of_a_run_that_lost_the_lease_publishes_nothing(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    lease = tmp_path / "out" / LEASE_FILE
    lease.write_text(json.dumps({"run_id": "mine", "heartbeat": time.time(), "stale_after": 60}))
    attempt = OwnedOutput(layout, "mine").attempt("s1")
    attempt.write("images/s1/a.png", b"mine")
    lease.write_text(json.dumps({"run_id": "newer", "host": "h", "pid": 9, "heartbeat": time.time()}))
    with pytest.raises(LeaseLost, match=f"run mine lost {layout.url} to run newer on host h, pid 9"):
        attempt.commit("shards/s1.json", b"{}")
    with pytest.raises(LeaseLost):
        OwnedOutput(layout, "mine").attempt("s2")  # a run that lost the output starts nothing
    for write in (
        lambda owned: owned.write_whole("_job.json", b"{}"),
        lambda owned: owned.remove("_SUCCESS"),
        lambda owned: owned.remove_files(["shards/s0.json"]),
        lambda owned: owned.clean_staging(),
    ):
        with pytest.raises(LeaseLost):
            write(OwnedOutput(layout, "mine"))
    assert [path for path in (tmp_path / "out").rglob("*") if path.is_file()] == [lease]


def test_the_audit_log_names_the_run_of_every_write_and_none_refused(tmp_path, monkeypatch):
    """IMAGEMILL_WRITE_AUDIT (core/write_audit.py): the lease's take and release and every write and
    delete through the gate are logged with their run, in order; a write refused for a lost lease is
    not (the chaos soak, bench/chaos.py, checks no run wrote after losing its lease from this log)."""
    from imagemill.core.lease import OutputLease
    from imagemill.core.write_audit import AUDIT_ENV, read_audit

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    layout = OutputLayout(str(tmp_path / "out"))
    with OutputLease.held(layout, "audited") as lease:
        owned = OwnedOutput(layout, lease.run_id)
        owned.write_whole("_job.json", b"{}")
        attempt = owned.attempt("s1")
        attempt.write("images/s1/a.png", b"a")
        attempt.commit("shards/s1.json", b"{}")
        owned.remove("_job.json")
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps({"run_id": "newer", "heartbeat": time.time()}))
    with pytest.raises(LeaseLost):
        OwnedOutput(layout, lease.run_id).write_whole("_SUCCESS", b"")
    out = str(tmp_path / "out")
    logged = [
        (entry["run"], entry["op"], entry["path"]) for entry in read_audit(str(tmp_path / "audit.jsonl"))
    ]
    assert logged == [
        (lease.run_id, "lease_take", f"{out}/{LEASE_FILE}"),
        (lease.run_id, "write", f"{out}/_job.json"),
        (lease.run_id, "publish", f"{out}/images/s1/a.png"),
        (lease.run_id, "publish", f"{out}/shards/s1.json"),
        (lease.run_id, "delete", f"{out}/_job.json"),
        (lease.run_id, "lease_release", f"{out}/{LEASE_FILE}"),
    ]


def test_a_lease_take_whose_answer_was_lost_is_still_logged(tmp_path, monkeypatch):
    """The write that takes the lease lands but its answer is lost (OSError after the swap); the retry
    conflicts with it and a re-read finds this run's lease: the take is logged all the same (the chaos
    soak found beats of a run with no take logged, its answer lost to a dropped connection)."""
    from imagemill.core import lease as lease_module
    from imagemill.core.write_audit import AUDIT_ENV, read_audit

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    swap, lost = lease_module._LocalStore.swap, []

    def answer_lost_once(self, data, expected):
        version = swap(self, data, expected)
        if not lost:
            lost.append(version)
            raise ConnectionResetError("the answer was lost")
        return version

    monkeypatch.setattr(lease_module._LocalStore, "swap", answer_lost_once)
    layout = OutputLayout(str(tmp_path / "out"))
    with lease_module.OutputLease.held(layout, "lost-answer") as lease:
        pass
    ops = [(entry["run"], entry["op"]) for entry in read_audit(str(tmp_path / "audit.jsonl"))]
    assert lost and ops == [(lease.run_id, "lease_take"), (lease.run_id, "lease_release")]


paths = st.sampled_from(["images/s/a.png", "images/s/b.png", "metadata/s.parquet", "data/s.parquet"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    committed=st.dictionaries(paths, st.binary(min_size=1, max_size=8), max_size=4),
    attempted=st.dictionaries(paths, st.binary(min_size=1, max_size=8), min_size=1, max_size=4),
)
def test_a_commit_never_replaces_a_file_another_run_committed(tmp_path_factory, committed, attempted):
    """Whatever the timing (the ownership check is skipped here: the stall between check and write),
    a commit is create-only: a path that holds other bytes fails it and keeps them; a path holding
    the same bytes (a retried or resumed publish) is fine; free paths get the attempt's bytes."""
    out = tmp_path_factory.mktemp("out")
    owned = OwnedOutput(OutputLayout(str(out)), "late")
    owned.check = lambda: None  # this run passed its check, then stalled while another run committed
    for relative, data in committed.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    attempt = owned.attempt("s")
    for relative, data in attempted.items():
        attempt.write(relative, data)
    clash = any(committed.get(relative, data) != data for relative, data in attempted.items())
    if clash:
        with pytest.raises(ShardConflict, match="already holds another run's file"):
            attempt.commit("shards/s.json", b"{}")
    else:
        attempt.commit("shards/s.json", b"{}")
        assert (out / "shards/s.json").read_bytes() == b"{}"
    for relative, data in committed.items():
        assert (out / relative).read_bytes() == data
    assert not (out / "shards/s.json").exists() or not clash
    assert not any((out / "_staging").rglob("*.*"))  # the staging folder is gone either way


def test_a_commit_on_s3_is_a_conditional_put_that_keeps_the_committed_object(s3_endpoint):
    import s3fs

    url = f"{make_bucket('gate-create-only')}/out"
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{url}/images/s/a.png", b"theirs")
    owned = OwnedOutput(OutputLayout(url), "late")
    owned.check = lambda: None
    attempt = owned.attempt("s")
    attempt.write("images/s/a.png", b"mine")
    attempt.write("images/s/b.png", b"mine too")
    with pytest.raises(ShardConflict):
        attempt.commit("shards/s.json", b"{}")
    fs.invalidate_cache()
    assert fs.cat_file(f"{url}/images/s/a.png") == b"theirs"
    assert not fs.exists(f"{url}/shards/s.json")
    again = owned.attempt("s")
    again.write("images/s/a.png", b"theirs")  # the same bytes: a retried publish
    again.commit("shards/s.json", b"{}")
    assert fs.cat_file(f"{url}/shards/s.json") == b"{}"
    assert not os.path.exists(attempt.staging) and not os.path.exists(again.staging)


@pytest.mark.parametrize("plant", ["symlink", "file", "fifo"])
def test_an_attempts_folder_that_is_a_symlink_a_file_or_a_fifo_is_one_line(tmp_path, plant):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    attempts = tmp_path / "out" / "_staging"
    {"symlink": lambda: attempts.symlink_to(tmp_path / "elsewhere"), "file": attempts.touch,
     "fifo": lambda: os.mkfifo(attempts)}[plant]()  # fmt: skip
    owned = OwnedOutput.unleased(OutputLayout(str(tmp_path / "out")))
    for use in (lambda: owned.attempt("s"), owned.clean_staging):
        with pytest.raises(ImagemillError, match="_staging is not a folder .*: move it away"):
            use()
    assert os.path.lexists(attempts) and list((tmp_path / "elsewhere").iterdir()) == []


# The gate walk: code that writes into an output outside the gate.

# Attribute names that write or delete, whatever the receiver (fsspec, pathlib, pyarrow).
WRITING_ATTRIBUTES = {
    "pipe_file", "put", "put_file", "rm", "rm_file", "rmdir", "makedirs", "mkdir", "touch", "mv", "move",
    "copy_file", "cp_file", "write_bytes", "write_text", "unlink", "rename", "symlink_to", "hardlink_to",
    "rmtree", "write_table", "write_dataset", "removedirs",
}  # fmt: skip
# Names that write only on a filesystem (`fs.pipe`, `output.fs.copy`): elsewhere a diffusers pipe, an array.
FILESYSTEM_ATTRIBUTES = {"pipe", "copy", "cp", "open"}
# Functions of these modules that write or delete, called as `os.remove(...)`, `shutil.copy(...)`.
WRITING_MODULE_CALLS = {
    "os": {"remove", "unlink", "replace", "rename", "link", "symlink", "makedirs", "mkdir", "rmdir",
           "truncate"},
    "shutil": {"copy", "copy2", "copyfile", "copytree", "move", "rmtree"},
}  # fmt: skip
# The storage primitives the gate is built on: anyone else using them bypasses the ownership check.
PRIMITIVES = {"remove_files", "remove_folder_if_empty", "write_file_atomically"}
# Modules that may write, each for a reason and with the names it may use (None: any); everything else
# in pipeline/ and workers/ goes through the gate. (pipeline/testing and pipeline/demo are builders no
# job code imports: a contract.)
ALLOWED = {
    "pipeline/core/write_gate.py": (None, "the gate itself"),
    "pipeline/core/storage.py": (None, "the primitives the gate is built on"),
    "pipeline/core/lease.py": (None, "the lease file, which the gate's check reads"),
    "pipeline/core/layout.py": ({"write_table"}, "parquet_bytes: a table into an in-memory buffer"),
    "workers/pieces.py": ({"write_table"}, "a piece of a row group into an in-memory buffer"),
    "workers/generators/diffusion/compile_cache.py": (None, "the compile cache, outside any output"),
    "pipeline/prompts/recipes.py": (None, "`imagemill prompts` writes its own Parquet file, not an output"),
    "pipeline/execution/scheduler.py": ({"open for writing"}, "a model-load traceback into Ray's log folder"),
    "pipeline/cli/submit.py": ({"mkdir", "write_text"}, "`imagemill submit` writes the job's spec to stage"),
    "pipeline/cli/job_files.py": (
        None,
        "`imagemill submit` copies the job's local files into its staging folder",
    ),
    "pipeline/core/model_source.py": (None, "a model downloaded into the local model cache"),
    "pipeline/core/spec/reference.py": ({"write_text"}, "docs/spec.md, generated"),
    "workers/generators/emulated.py": ({"put"}, "a step's time onto the emulated device's queue.Queue"),
}
NOT_JOB_CODE = ("pipeline/testing/", "pipeline/demo/")


def _writes_mode(call: ast.Call) -> bool:
    mode = (
        call.args[1]
        if len(call.args) > 1
        else next((k.value for k in call.keywords if k.arg == "mode"), None)
    )
    return (
        isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))
    )


def writes_outside_the_gate(source: str) -> list[str]:
    """Every place in `source` that writes or deletes a file other than through the gate, as
    'line: what'. Attribute references count whether called or aliased (`put = fs.pipe_file`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        what = None
        if isinstance(node, ast.Attribute):
            receiver = node.value
            on_fs = (isinstance(receiver, ast.Name) and receiver.id == "fs") or (
                isinstance(receiver, ast.Attribute) and receiver.attr == "fs"
            )
            if node.attr in WRITING_ATTRIBUTES or (on_fs and node.attr in FILESYSTEM_ATTRIBUTES - {"open"}):
                what = node.attr
            elif isinstance(node.value, ast.Name) and node.attr in WRITING_MODULE_CALLS.get(
                node.value.id, ()
            ):
                what = f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.Name) and node.id in PRIMITIVES:
            what = node.id
        elif isinstance(node, ast.ImportFrom) and any(alias.name in PRIMITIVES for alias in node.names):
            what = f"import from {node.module}"
        elif isinstance(node, ast.Call) and _writes_mode(node):
            func = node.func
            in_memory = any(keyword.arg == "fileobj" for keyword in node.keywords)  # tarfile into a buffer
            if not in_memory and (
                (isinstance(func, ast.Name) and func.id == "open")
                or (isinstance(func, ast.Attribute) and func.attr == "open")
            ):
                what = "open for writing"
        if what:
            found.append(f"{node.lineno}: {what}")
    return found


def _job_modules() -> dict[str, str]:
    return {
        str(path.relative_to(ROOT)): path.read_text()
        for folder in ("pipeline", "workers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(NOT_JOB_CODE)
    }


def test_nothing_writes_into_an_output_outside_the_write_gate():
    offenders = {}
    for name, source in _job_modules().items():
        allowed, _ = ALLOWED.get(name, (set(), ""))
        if allowed is not None:
            found = [hit for hit in writes_outside_the_gate(source) if hit.split(": ", 1)[1] not in allowed]
            if found:
                offenders[name] = found
    assert offenders == {}
    assert set(ALLOWED) <= set(_job_modules())  # no stale allowance


@pytest.mark.parametrize(
    "planted",
    [
        "output.fs.pipe_file(output.path('x'), b'')",
        "fs.pipe(output.path('x'), b'')",
        "output.fs.copy(a, output.path('x'))",
        "put = output.fs.pipe_file",
        "output.fs.rm_file(output.path('_SUCCESS'))",
        "with output.fs.open(output.path('x'), 'wb') as f: pass",
        "with output.fs.open(output.path('x'), mode='ab') as f: pass",
        "open(path, 'w').write('x')",
        "os.replace(a, b)",
        "shutil.rmtree(folder)",
        "Path(folder).write_bytes(b'')",
        "pq.write_table(table, output.path('x'))",
        "from imagemill.core.storage import write_file_atomically",
        "remove_files(output.fs, paths)",
    ],
)
def test_the_gate_walk_finds_a_planted_write(planted):
    source = (
        _job_modules()["pipeline/execution/runner.py"] + f"\n\ndef planted(output, path):\n    {planted}\n"
    )
    assert writes_outside_the_gate(source)


def test_a_commit_cut_short_is_cleared_by_the_next_run_and_redone(tmp_path):
    """A commit that published some files and no stats (a killed actor) leaves them at their final
    paths; the next run, the lease holder, deletes them before redoing the shard, whose create-only
    commit then finds its paths free."""
    import imagemill
    from imagemill.testing.in_process import output_hashes, run_in_process

    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=16, row_group_size=4)
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(input=tmp_path / "prompts", output=tmp_path / "out"))
    assert run_in_process(imagemill.load_spec(job)).complete
    expected = output_hashes(tmp_path / "out")
    [stats, *_] = sorted((tmp_path / "out" / "shards").glob("*.json"))
    stats.unlink()
    [image, *_] = sorted((tmp_path / "out" / "images" / stats.stem).iterdir())
    image.write_bytes(b"another attempt's bytes")
    result = run_in_process(imagemill.load_spec(job))
    assert result.complete and result.shards_run == 1
    assert output_hashes(tmp_path / "out") == expected


def test_a_retry_of_a_shard_this_run_committed_keeps_that_commit(tmp_path):
    """An actor that died right after its commit: the shard's retry finds the stats of this run's own
    commit, which stand; another run's stats there fail the retry and stay as they are."""
    from imagemill.core.records import ShardStats, commit_shard

    (tmp_path / "out").mkdir()
    fresh = {"heartbeat": time.time(), "stale_after": 600}
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps({"run_id": "run-1", **fresh}))
    owned = OwnedOutput(OutputLayout(str(tmp_path / "out")), "run-1")
    first = ShardStats(shard_id="s", run_id="run-1", input_file="f", rows=1, ok=1, error=0, finished_at="t1")
    for stats, expected in ((first, first), (first.model_copy(update={"finished_at": "t2"}), first)):
        attempt = owned.attempt("s")
        attempt.write("images/s/a.png", b"the image")
        assert commit_shard(attempt, stats) == expected
    other = first.model_copy(update={"run_id": "run-0", "shard_id": "t"})
    (tmp_path / "out" / "shards" / "t.json").write_bytes(other.record_bytes())
    with pytest.raises(ShardConflict):
        commit_shard(owned.attempt("t"), first.model_copy(update={"shard_id": "t"}))
    assert (tmp_path / "out" / "shards" / "t.json").read_bytes() == other.record_bytes()


EMULATED_JOB = """\
name: gate-intruded
input: {{path: {input}, rows_per_shard: 4}}
output: {{path: {output}}}
model: {{kind: emulated, emulation: {{images_per_second: 12, launch_ms_per_step: 0}}}}
generation: {{width: 32, height: 32, num_inference_steps: 1, guidance_scale: 3.0}}
workers: {{num_workers: 1, batch_size: 4}}
"""


@pytest.mark.ray
@pytest.mark.cli
def test_files_a_lost_run_published_into_an_uncommitted_shard_are_cleared_and_the_shard_redone(
    ray_address, tmp_path
):
    """A run that lost the lease and stalled between its check and its write publishes into shards
    the lease holder has not committed yet (create-only stops it only at committed ones). Planted here
    once the holder's first shard commits: a foreign stats record and image in every other shard. Each
    such shard's commit conflicts once; the holder clears those files and redoes it: exit 0, and every
    file byte-identical to an undisturbed run's."""
    from imagemill.core.records import ShardStats
    from imagemill.testing.in_process import output_hashes

    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=24, row_group_size=4)
    for name in ("quiet", "out"):
        (tmp_path / f"{name}.yaml").write_text(
            EMULATED_JOB.format(input=tmp_path / "prompts", output=tmp_path / name)
        )
    quiet = run_cli("run", str(tmp_path / "quiet.yaml"), "--no-progress", ray_address=ray_address)
    assert quiet.returncode == 0, quiet.stderr
    expected = output_hashes(tmp_path / "quiet")
    shard_ids = sorted(path.stem for path in (tmp_path / "quiet" / "shards").glob("*.json"))
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "imagemill.cli", "run", str(tmp_path / "out.yaml"), "--no-progress"],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while _commits(out) < 1:
        assert driver.poll() is None and time.time() < deadline, "the run ended or stalled"
        time.sleep(0.01)
    planted = []
    for shard_id in shard_ids:  # create-only, as the lost run's commit publishes
        lost = ShardStats(
            shard_id=shard_id, run_id="run-lost", input_file="f", rows=4, ok=4, error=0, finished_at="t"
        )
        image = next(iter(sorted((tmp_path / "quiet" / "images" / shard_id).iterdir())))
        (out / "images" / shard_id).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (out / "images" / shard_id / image.name).open("xb").write(b"the lost run's bytes")
        with contextlib.suppress(FileExistsError):
            (out / "shards" / f"{shard_id}.json").open("xb").write(lost.record_bytes())
            planted.append(shard_id)
    _, stderr = driver.communicate(timeout=180)
    assert driver.returncode == 0, stderr
    assert len(planted) >= 3, "the run committed most shards before the plant: slow the emulated device"
    assert output_hashes(out) == expected
    for shard_id in shard_ids:
        assert json.loads((out / "shards" / f"{shard_id}.json").read_text())["run_id"] != "run-lost"
    assert stderr.count("clearing files another attempt left at its paths, to retry") == len(planted), stderr
