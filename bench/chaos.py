"""The chaos soak (issue #23): real drivers, a real Ray cluster and S3 output behind a fault proxy,
faults at random for a while, then a quiet final run; the output must come out as if nothing happened.

    python bench/chaos.py --minutes 20 --rows 100000             # the full soak, noop model
    python bench/chaos.py --minutes 2 --rows 5000                # a short one
    python bench/chaos.py --minutes 1 --rows 2000 --event-gap 5  # CI's (tests/test_chaos.py: ~140 s)
    python bench/chaos.py --minutes 3 --rows 128 --model demo    # the demo model (jobs/models/demo-shapes)

Set-up: a moto S3 server, `imagemill.testing.s3_fault_proxy` in front of it (every driver and actor
talks to S3 through the proxy: AWS_ENDPOINT_URL), a `ray.cluster_utils.Cluster` of a head taking no
actors and 3 worker nodes, and drivers that are `imagemill run` subprocesses joining it (RAY_ADDRESS),
so a SIGKILL or SIGSTOP hits a real driver. The prompts are Parquet on the same S3. User files are
planted beside the outputs and in sibling prefixes whose names start like the outputs'.

First an undisturbed reference run of the same spec. Then, for --minutes, a driver is kept running on
the job (a new output, round after round, whenever one completes) while events drawn from a seeded
RNG hit it: driver SIGKILL; driver SIGSTOP past the lease timeout, a second driver taking over, the
first one continued; a worker node removed and re-added; a node drained with a deadline through
Ray's real drain call (`ray drain-node`), removed at the deadline and replaced; a ShardWorker actor
process SIGKILLed; S3 503s, slow-downs, and connections dropped before or after the request reached
S3; `_job.json` cut in half. Then the faults stop and a quiet final `imagemill run` finishes every
round's output.

Pass, for every round: every input row exactly once in the metadata; every file byte-identical to the
reference run's, except the files that carry run ids and times by design (EXCLUDED: `_job.json`,
`report.json`, `report.html`, `shards/*.json`, and `attempts/*.json`, which only a disturbed run
has); no key outside the job outputs changed, appeared or went (the bucket is snapshotted before the
soak); no run wrote after losing its lease (IMAGEMILL_WRITE_AUDIT: core/write_audit.py logs every
write with its run id; a write that started after another run had taken that output's lease, or after
its own release, fails the soak, as does a write outside the outputs or without a run); and
`imagemill status` (exit 0, its counts) and report.json agree with the files. The results, with the
events by kind and the load average, are appended to RELIABILITY.md (--results). Exit 0: pass.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
BUCKET = "chaos"
OBJECT_STORE_BYTES = 100 * 1024 * 1024
NODES = 3
WORKERS = 3
EXCLUDED = ("_job.json", "report.json", "report.html", "shards/", "attempts/")  # carry run ids, times
# User files planted before the soak: beside the outputs, in prefixes that start like theirs, elsewhere.
PLANTED = (
    "job-r0.json",
    "job-r0-old/images/x.png",
    "job-r1_backup/metadata/part.parquet",
    "job-r/notes.txt",
    "reference-2/_job.json",
    "other/images/keep.png",
)
EVENTS = (
    "driver_kill",
    "driver_pause",
    "node_remove",
    "node_drain",
    "actor_kill",
    "s3_503",
    "s3_slow",
    "s3_drop",
    "job_json_truncate",
)


def job_spec(model: str, prompts: str, output: str) -> dict[str, Any]:
    """The soak's job: the noop kind into WebDataset tars (100,000 rows are 200 tars, not 100,000
    objects), or the demo model into PNG files."""
    if model == "noop":
        return {
            "name": "chaos",
            "input": {"path": prompts, "rows_per_shard": 500},
            "output": {"path": output, "format": "webdataset"},
            "model": {"kind": "noop"},
            "generation": {"width": 16, "height": 16},
            "workers": {"batch_size": 100},
        }
    return {
        "name": "chaos-demo",
        "input": {"path": prompts, "rows_per_shard": 16},
        "output": {"path": output, "image_format": "png"},
        "model": {"source": str(REPO / "jobs" / "models" / "demo-shapes")},
        "generation": {"width": 32, "height": 32, "num_inference_steps": 10, "guidance_scale": 3.0},
        "workers": {"batch_size": 8},
    }


def prompt_table(rows: int, start: int) -> pa.Table:
    colours, shapes = ("red", "yellow", "green", "blue", "purple"), ("circle", "square", "triangle")
    ids = range(start, start + rows)
    return pa.table(
        {
            "id": [f"row-{i:06d}" for i in ids],
            "prompt": [f"a {colours[i % 5]} {shapes[i // 5 % 3]} on a white background {i}" for i in ids],
        }
    )


@dataclass
class Event:
    at: float  # seconds since the chaos began
    kind: str
    detail: str
    follow_up: bool = False  # a later step of an event already counted (the takeover, the deadline)


@dataclass
class Driver:
    """One `imagemill run` subprocess on one round's output."""

    process: subprocess.Popen
    round: int
    log: Path
    paused: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def last_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""


@dataclass
class Soak:
    args: argparse.Namespace
    work: Path
    proxy: Any
    cluster: Any
    direct: Any  # s3fs straight to moto: the soak's own reads and the truncation, never faulted
    rng: random.Random
    spec_template: dict[str, Any]
    nodes: list[Any] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    timers: list[tuple[float, str, Any]] = field(default_factory=list)  # (when, what, action)
    drivers: list[Driver] = field(default_factory=list)
    current: Driver | None = None
    # Paused drivers continued: (the time by which one whose lease was taken over must have ended, or
    # None for one that carries on, its lease not taken), the driver.
    resumed: list[tuple[float | None, Driver]] = field(default_factory=list)
    rounds: int = 0
    exits: collections.Counter = field(default_factory=collections.Counter)
    resumed_exits: collections.Counter = field(default_factory=collections.Counter)
    notes: list[str] = field(default_factory=list)
    started: float = 0.0

    # --- drivers ----------------------------------------------------------------------------------

    def output(self, round_: int) -> str:
        return f"s3://{BUCKET}/job-r{round_}"

    def spec_path(self, output: str) -> Path:
        spec = json.loads(json.dumps(self.spec_template))
        spec["output"]["path"] = output
        path = self.work / f"{output.rsplit('/', 1)[-1]}.yaml"
        path.write_text(json.dumps(spec))  # JSON is YAML
        return path

    def start_driver(self, round_: int) -> Driver:
        log = self.work / "drivers" / f"{len(self.drivers):03d}-r{round_}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "imagemill.cli", "run", str(self.spec_path(self.output(round_)))]
                + ["--num-workers", str(WORKERS), "--no-progress"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_ADDRESS": self.cluster.address},
            )
        driver = Driver(process, round_, log)
        self.drivers.append(driver)
        return driver

    def reap(self) -> None:
        """Count the exits of drivers that ended; a completed round starts the next one. A paused
        driver, once continued, must end (it lost its lease): 120 s later it is killed and noted."""
        for deadline, driver in list(self.resumed):
            if driver.alive() and (deadline is None or time.monotonic() < deadline):
                continue
            self.resumed.remove((deadline, driver))
            if driver.alive():
                driver.process.kill()
                driver.process.wait()
                self.notes.append(
                    f"paused driver {driver.log.name} kept running 120 s after losing its lease"
                )
            code = driver.process.returncode
            self.resumed_exits[code] += 1
            self.record(
                "driver_pause", f"{driver.log.name} ended: exit {code}: {driver.last_line()[:160]}", True
            )
        current = self.current
        if current is not None and not current.paused and not current.alive():
            code = current.process.returncode
            self.exits[code] += 1
            if code not in (0, -signal.SIGKILL):
                self.notes.append(f"driver {current.log.name} exit {code}: {current.last_line()[:200]}")
            if code == 0 and self.direct.exists(f"{BUCKET}/job-r{current.round}/_SUCCESS"):
                self.rounds = current.round + 1
            self.current = None
        if self.current is None and self.chaos_on:
            # A paused driver continued with its lease not taken (the second driver ended first) is
            # the job's driver again: the faults hit it, and no new driver is started to be refused.
            carrying = [(deadline, d) for deadline, d in self.resumed if deadline is None and d.alive()]
            if carrying:
                self.resumed.remove(carrying[0])
                self.current = carrying[0][1]
            else:
                self.current = self.start_driver(self.rounds)

    chaos_on: bool = True

    # --- events -----------------------------------------------------------------------------------

    def record(self, kind: str, detail: str, follow_up: bool = False) -> None:
        self.events.append(Event(round(time.monotonic() - self.started, 1), kind, detail, follow_up))
        print(f"[{self.events[-1].at:7.1f} s] {kind}: {detail}", flush=True)

    def later(self, delay: float, what: str, action) -> None:
        self.timers.append((time.monotonic() + delay, what, action))

    def run_timers(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = sorted((timer for timer in self.timers if everything or timer[0] <= now), key=lambda t: t[0])
        self.timers = [timer for timer in self.timers if timer not in due]
        for _, what, action in due:
            print(f"  (timer: {what})", flush=True)
            action()

    def event(self) -> None:
        kind = self.rng.choice(EVENTS)
        getattr(self, kind)()

    def driver_kill(self) -> None:
        if self.current is None or self.current.paused or not self.current.alive():
            return self.record("driver_kill", "skipped: no running driver")
        self.current.process.kill()
        self.record("driver_kill", f"SIGKILL {self.current.log.name}")

    def lease_holder(self, round_: int) -> tuple[str | None, int | None]:
        """The run and driver pid a round's lease file names now (None: no lease, or unreadable)."""
        try:
            record = json.loads(self.direct.cat_file(f"{BUCKET}/job-r{round_}/_lease.json"))
            return record.get("run_id"), record.get("pid")
        except (FileNotFoundError, ValueError, AttributeError):
            return None, None

    def driver_pause(self) -> None:
        """SIGSTOP the driver; past the lease timeout a second driver starts; once it has taken the
        lease, the first is continued: it must end (exit 2) within 120 s, writing nothing more."""
        driver = self.current
        if driver is None or driver.paused or not driver.alive():
            return self.record("driver_pause", "skipped: no running driver")
        driver.process.send_signal(signal.SIGSTOP)
        driver.paused = True
        holder, pid = self.lease_holder(driver.round)  # its run, or one it had not yet taken over
        held = pid == driver.process.pid
        self.record(
            "driver_pause",
            f"SIGSTOP {driver.log.name} ({'holding' if held else 'not yet holding'} the lease)",
        )

        def take_over() -> None:
            if not self.chaos_on:
                return resume()
            self.current = self.start_driver(driver.round)
            self.record("driver_pause", f"second driver {self.current.log.name} started", True)
            self.later(2, "resume", resume)

        def resume() -> None:
            now_holder, _ = self.lease_holder(driver.round)
            taken = now_holder not in (None, holder)
            other = self.current  # the second driver, or the one started after it ended
            if not taken and self.chaos_on and other is not None and other is not driver and other.alive():
                return self.later(1, "resume", resume)  # it has not taken the lease yet
            driver.process.send_signal(signal.SIGCONT)
            driver.paused = False
            # It lost its lease: it must end. Else (paused before it took the lease, or the soak's end
            # came first) it carries on as a driver, or is refused if another holds the lease.
            self.resumed.append((time.monotonic() + 120 if taken and held else None, driver))
            self.record("driver_pause", f"SIGCONT {driver.log.name}; the lease names run {now_holder}", True)

        self.later(self.args.lease_timeout + 2, "take over", take_over)

    def worker_nodes(self) -> list[Any]:
        return [node for node in self.nodes if node.remaining_processes_alive()]

    def add_node(self) -> None:
        self.nodes.append(self.cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES))

    def node_remove(self) -> None:
        alive = self.worker_nodes()
        if len(alive) < 2:
            return self.record("node_remove", "skipped: one node left")
        node = self.rng.choice(alive)
        self.cluster.remove_node(node)
        self.nodes.remove(node)
        back = self.rng.uniform(5, 15)
        self.record("node_remove", f"node {node.node_id[:8]} removed, a node back in {back:.0f} s")
        self.later(back, "re-add", self.add_node)

    def node_drain(self) -> None:
        alive = self.worker_nodes()
        if len(alive) < 2:
            return self.record("node_drain", "skipped: one node left")
        node = self.rng.choice(alive)
        deadline = int(self.rng.uniform(5, 20))
        drained = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", self.cluster.address]
            + ["--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
            + ["--reason-message", "chaos soak", "--deadline-remaining-seconds", str(deadline)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        answer = "accepted" if drained.returncode == 0 else f"refused: {drained.stderr.strip()[-160:]}"
        self.record("node_drain", f"node {node.node_id[:8]} drained, deadline {deadline} s: {answer}")

        def at_deadline() -> None:  # what the autoscaler does: the node goes, a new one comes
            if node in self.nodes:
                self.cluster.remove_node(node)
                self.nodes.remove(node)
            self.add_node()
            self.record(
                "node_drain", f"node {node.node_id[:8]} removed at its deadline, a new node added", True
            )

        self.later(deadline, "drain deadline", at_deadline)

    def actor_kill(self) -> None:
        import psutil

        actors = []
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = (process.cmdline() or [process.name()])[0]
                # busy: ray::ShardWorkerActor.process_shard; else ray::<its name>:ShardWorkerActor.<method>
                if "ShardWorkerActor" in title and process.status() != psutil.STATUS_ZOMBIE:
                    actors.append(process)
        if not actors:
            return self.record("actor_kill", "skipped: no actor")
        victim = self.rng.choice(actors)
        with contextlib.suppress(psutil.Error):
            victim.kill()
        self.record("actor_kill", f"SIGKILL actor pid {victim.pid}")

    def fault_window(self, kind: str, settings: dict[str, Any]) -> None:
        seconds = self.rng.uniform(5, 15)
        for name, value in settings.items():
            setattr(self.proxy, name, value)
        self.record(kind, f"{settings} for {seconds:.0f} s")
        self.later(seconds, f"end {kind}", lambda: [setattr(self.proxy, name, 0) for name in settings])

    def s3_503(self) -> None:
        self.fault_window("s3_503", {"fail_every": self.rng.choice((3, 5, 10))})

    def s3_slow(self) -> None:
        self.fault_window("s3_slow", {"delay": round(self.rng.uniform(0.2, 1.5), 2)})

    def s3_drop(self) -> None:
        self.fault_window(
            "s3_drop", {"drop_every": self.rng.choice((5, 11)), "lose_answer_every": self.rng.choice((7, 13))}
        )

    def job_json_truncate(self) -> None:
        path = f"{BUCKET}/job-r{self.rounds}/_job.json"
        try:
            data = self.direct.cat_file(path)
        except FileNotFoundError:
            return self.record("job_json_truncate", f"skipped: no {path} yet")
        self.direct.pipe_file(path, data[: len(data) // 2])
        self.record("job_json_truncate", f"{path}: {len(data)} -> {len(data) // 2} bytes")

    # --- the soak ---------------------------------------------------------------------------------

    def chaos(self, seconds: float, gap: float) -> None:
        self.started = time.monotonic()
        end = self.started + seconds
        next_event = self.started + self.rng.uniform(0.5, 1.5) * gap
        while time.monotonic() < end:
            self.reap()
            self.run_timers()
            if time.monotonic() >= next_event:
                self.event()
                next_event = time.monotonic() + self.rng.uniform(0.5, 1.5) * gap
            time.sleep(0.2)
        self.chaos_on = False
        self.run_timers(everything=True)  # a paused driver continued, nodes back, the proxy quiet
        for name in ("fail_every", "delay", "drop_every", "lose_answer_every"):
            setattr(self.proxy, name, 0)
        while len(self.worker_nodes()) < NODES:
            self.add_node()
        if self.current is not None and self.current.alive():
            self.record("quiet", f"waiting for {self.current.log.name} to end")
            try:
                self.current.process.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                self.current.process.kill()
                self.notes.append(f"driver {self.current.log.name} kept running 30 min after the faults")
        while self.resumed:
            self.reap()
            for deadline, driver in self.resumed:
                if deadline is None and time.monotonic() > self.started + seconds + 1800:
                    driver.process.kill()
                    self.notes.append(f"driver {driver.log.name} kept running 30 min after the faults")
            time.sleep(0.2)
        self.reap()


def bucket_keys(direct, prefixes_out: list[str]) -> dict[str, bytes]:
    """Every object of the bucket outside the given output prefixes, with its bytes."""
    direct.invalidate_cache()
    keys = [key for key in direct.find(BUCKET) if not any(key.startswith(p + "/") for p in prefixes_out)]
    return {key: direct.cat_file(key) for key in keys}


def output_files(direct, root: str) -> dict[str, bytes]:
    """An output's files (relative path: bytes) but those that carry run ids and times (EXCLUDED)."""
    direct.invalidate_cache()
    files = {}
    for key in direct.find(root):
        relative = key[len(root) + 1 :]
        if not relative.startswith(EXCLUDED):
            files[relative] = direct.cat_file(key)
    return files


def check_rows(files: dict[str, bytes], expected: set[str]) -> list[str]:
    """Every input row exactly once in the metadata."""
    ids = []
    for relative, data in files.items():
        if relative.startswith("metadata/"):
            ids += pq.read_table(io.BytesIO(data), columns=["id"]).column("id").to_pylist()
    problems = []
    if len(ids) != len(set(ids)):
        twice = [i for i, n in collections.Counter(ids).items() if n > 1]
        problems.append(f"{len(twice)} rows more than once, e.g. {twice[:3]}")
    if set(ids) != expected:
        missing, extra = expected - set(ids), set(ids) - expected
        problems.append(f"{len(missing)} rows missing (e.g. {sorted(missing)[:3]}), {len(extra)} unknown")
    return problems


def check_audit(audit: list[dict], roots: list[str]) -> tuple[list[str], int]:
    """No write by a run once another run had taken that output's lease, or after its own release;
    none outside the outputs, none without a run. Also the count of writes that overlapped a
    takeover (started before it landed, ended after): the check-then-write window, reported."""
    problems, overlaps = [], 0
    takes: dict[str, list[dict]] = collections.defaultdict(list)  # by output root
    owned: dict[str, tuple[str, float]] = {}  # run -> (root, its take's end)
    released: dict[str, float] = {}
    for entry in audit:
        root = next((r for r in roots if entry["path"].startswith(r + "/")), None)
        if entry["op"] == "lease_take" and root:
            takes[root].append(entry)
            owned[entry["run"]] = (root, entry["end"])
        if entry["op"] == "lease_release":
            released[entry["run"]] = entry["end"]
    for entry in audit:
        run = entry["run"]
        paths = entry["path"].split(" ") if entry["op"] == "delete" else [entry["path"]]
        outside = [p for p in paths if not any(p.startswith(r + "/") for r in roots)]
        if outside:
            problems.append(f"run {run} wrote outside the outputs: {entry['op']} {outside[:2]}")
        if run is None:
            problems.append(f"a write with no run: {entry['op']} {entry['path'][:120]}")
            continue
        if entry["op"] == "lease_take" or run not in owned:
            if run not in owned:
                problems.append(f"run {run} wrote without ever taking a lease: {entry['op']} {entry['path']}")
            continue
        root, taken = owned[run]
        lost = min([t["end"] for t in takes[root] if t["run"] != run and t["end"] > taken], default=None)
        ends = [t for t in (lost, released.get(run)) if t is not None]
        if entry["op"] == "lease_release":
            ends = [lost] if lost is not None else []
        if ends and entry["start"] > min(ends):
            problems.append(
                f"run {run} wrote after losing {root}'s lease ({entry['start'] - min(ends):.2f} s after): "
                f"{entry['op']} {entry['path'][:120]}"
            )
        elif lost is not None and entry["start"] <= lost < entry["end"]:
            overlaps += 1
    return problems, overlaps


def check_reported(root: str, files: dict[str, bytes], rows: int, direct) -> list[str]:
    """`imagemill status` (exit 0, its counts) and report.json agree with the files."""
    shards = sum(1 for relative in files if relative.startswith("metadata/"))
    status = subprocess.run(
        [sys.executable, "-m", "imagemill.cli", "status", f"s3://{root}"], capture_output=True, text=True
    )
    problems = []
    if status.returncode != 0:
        problems.append(f"imagemill status s3://{root}: exit {status.returncode}: {status.stdout[-300:]}")
    for line in (f"shards: {shards}/{shards} done", f"rows:   {rows}/{rows} done: {rows} ok, 0 error"):
        if line not in status.stdout:
            problems.append(f"imagemill status s3://{root} does not say {line!r}: {status.stdout[-300:]}")
    report = json.loads(direct.cat_file(f"{root}/report.json"))
    counts = report["counts"]
    expected = {"rows_total": rows, "rows_done": rows, "rows_ok": rows, "rows_error": 0}
    expected |= {"shards_total": shards, "shards_done": shards, "shards_failed": 0}
    wrong = {name: counts.get(name) for name, value in expected.items() if counts.get(name) != value}
    if wrong:
        problems.append(f"{root}/report.json counts {wrong}, the files say {expected}")
    stats = len([key for key in direct.find(f"{root}/shards") if key.endswith(".json")])
    if stats != shards:
        problems.append(f"{root}: {stats} shard stats files for {shards} metadata files")
    return problems


def quiet_run(spec: Path, address: str, log: Path) -> tuple[int, float]:
    started = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "imagemill.cli", "run", str(spec), "--num-workers", str(WORKERS)]
            + ["--no-progress"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": address},
            timeout=3600,
        ).returncode
    return code, time.monotonic() - started


def results_section(args, soak: Soak, figures: dict[str, Any], problems: list[str]) -> str:
    firsts = [event for event in soak.events if not event.follow_up]
    counts = collections.Counter(event.kind for event in firsts if "skipped" not in event.detail)
    skipped = collections.Counter(event.kind for event in firsts if "skipped" in event.detail)
    command = f"python bench/chaos.py --minutes {args.minutes:g} --rows {args.rows}"
    command += f" --model {args.model}" if args.model != "noop" else ""
    command += f" --seed {args.seed}" if args.seed != 0 else ""
    lines = [
        f"## Chaos soak, {args.model} model, {args.rows} rows, {args.minutes:g} min "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC): {'PASS' if not problems else 'FAIL'}",
        "",
        f"`{command}` (seed {args.seed}, lease timeout {args.lease_timeout:g} s, an event every "
        f"~{args.event_gap:g} s); load average {figures['load_before']} before, {figures['load_after']} "
        "after (2 cores shared with other work: times are under load).",
        "",
        f"- reference run (undisturbed): {figures['reference_seconds']:.0f} s; faults, then the driver "
        f"running when they stopped ran to its end: {figures['chaos_seconds']:.0f} s, {soak.rounds} "
        "round(s) completed under faults, "
        f"{figures['rounds_checked']} output(s) checked; quiet final runs: {figures['final_seconds']:.0f} s",
        "- events injected: "
        + ", ".join(f"{kind} {counts[kind]}" for kind in EVENTS)
        + (f" (skipped, nothing to hit: {dict(skipped)})" if skipped else ""),
        f"- drivers: {len(soak.drivers)} started; exits {dict(sorted(soak.exits.items(), key=str))}; "
        f"paused drivers' exits once continued {dict(soak.resumed_exits)}",
        f"- proxy: {soak.proxy.requests} requests, {soak.proxy.slowdowns} answered 503, "
        f"{soak.proxy.drops} dropped unanswered, {soak.proxy.lost_answers} answers lost after reaching S3",
        f"- write audit: {figures['audit_writes']} writes logged; {figures['overlaps']} overlapped a "
        "takeover of their output (started before it, ended after)",
    ]
    errors = collections.Counter(note.split(": ", 1)[-1][:140] for note in soak.notes)
    if errors:
        lines.append("- drivers that ended with an error (not killed by the soak), by their last line:")
        lines += [f"  - {count} × `{line}`" for line, count in errors.most_common(8)]
    if problems:
        lines += ["- **failures:**", *(f"  - {problem}" for problem in problems[:20])]
    else:
        lines.append(
            "- every row exactly once, every file byte-identical to the reference run (but "
            f"{', '.join(EXCLUDED)}), the bucket's other keys untouched, no write after a lost lease, "
            "status and report.json agree with the files"
        )
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    text = (
        path.read_text()
        if path.exists()
        else (
            "# Reliability\n\nWritten by `bench/chaos.py` (the chaos soak: what it does and what it checks "
            "is in its docstring). Newest last.\n"
        )
    )
    path.write_text(text.rstrip("\n") + "\n\n" + section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the faults go on")
    parser.add_argument("--rows", type=int, default=100_000, help="input rows")
    parser.add_argument("--model", choices=("noop", "demo"), default="noop")
    parser.add_argument("--seed", type=int, default=0, help="the RNG drawing the events")
    parser.add_argument("--event-gap", type=float, default=10.0, help="mean seconds between events")
    parser.add_argument("--lease-timeout", type=float, default=8.0, help="IMAGEMILL_LEASE_TIMEOUT")
    parser.add_argument("--results", type=Path, default=REPO / "RELIABILITY.md", help="appended to")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, audit)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagemill-chaos-"))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    upstream = f"http://{host}:{port}"
    from imagemill.testing.s3_fault_proxy import S3FaultProxy

    proxy = S3FaultProxy(upstream).start()
    audit_path = work / "audit.jsonl"
    # Before the cluster starts, so every node, driver and actor inherits them.
    os.environ.update(
        AWS_ENDPOINT_URL=proxy.url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
        IMAGEMILL_LEASE_TIMEOUT=str(args.lease_timeout),
        IMAGEMILL_WRITE_AUDIT=str(audit_path),
        IMAGEMILL_CACHE_DIR=str(work / "cache"),
        # A loaded machine (the soak's own load, or others') can take over Ray's 10 s to register a node.
        RAY_raylet_start_wait_time_s="120",
    )
    import s3fs

    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": upstream}, use_listings_cache=False)
    direct.mkdir(BUCKET)
    per_file = -(-args.rows // 4)
    for index, start in enumerate(range(0, args.rows, per_file)):
        table = prompt_table(min(per_file, args.rows - start), start)
        with direct.open(f"{BUCKET}/prompts/part-{index:03d}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=100 if args.model == "noop" else 16)
    expected = {f"row-{i:06d}" for i in range(args.rows)}
    for key in PLANTED:
        direct.pipe_file(f"{BUCKET}/{key}", f"a user's file: {key}\n".encode())

    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Not the machine's "current" Ray (/tmp/ray/ray_current_cluster): another ray.init() here must not
    # join this cluster.
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    spec_template = job_spec(args.model, f"s3://{BUCKET}/prompts", "")
    soak = Soak(args, work, proxy, cluster, direct, random.Random(args.seed), spec_template)
    problems: list[str] = []
    figures: dict[str, Any] = {"load_before": " ".join(load_before)}
    try:
        for _ in range(NODES):
            soak.add_node()
        cluster.wait_for_nodes()
        code, figures["reference_seconds"] = quiet_run(
            soak.spec_path(f"s3://{BUCKET}/reference"), cluster.address, work / "reference.log"
        )
        print(f"reference run: exit {code} in {figures['reference_seconds']:.0f} s", flush=True)
        if code != 0:
            raise SystemExit(f"the undisturbed reference run failed: {(work / 'reference.log').read_text()}")
        reference = output_files(direct, f"{BUCKET}/reference")
        problems += [f"reference: {p}" for p in check_rows(reference, expected)]
        before = bucket_keys(direct, [])  # the reference output included: nothing may touch it
        started = time.monotonic()
        soak.chaos(args.minutes * 60, args.event_gap)
        figures["chaos_seconds"] = time.monotonic() - started

        started = time.monotonic()
        rounds = sorted({driver.round for driver in soak.drivers})
        finals = {}
        for round_ in rounds:
            log = work / f"final-r{round_}.log"
            finals[round_], _ = quiet_run(soak.spec_path(soak.output(round_)), cluster.address, log)
            if finals[round_] != 0:
                problems.append(f"the quiet final run of job-r{round_}: exit {finals[round_]}: "
                                f"{log.read_text()[-400:]}")  # fmt: skip
        figures["final_seconds"] = time.monotonic() - started
        figures["rounds_checked"] = len(rounds)

        jobs = [f"{BUCKET}/job-r{r}" for r in rounds]
        after = bucket_keys(direct, jobs)
        changed = [key for key in before if after.get(key) != before[key]]
        appeared = [key for key in after if key not in before]
        if changed or appeared:
            problems.append(f"keys outside the job changed or went {changed[:5]}, appeared {appeared[:5]}")
        for round_, root in zip(rounds, jobs, strict=True):
            files = output_files(direct, root)
            problems += [f"job-r{round_}: {p}" for p in check_rows(files, expected)]
            differ = sorted(k for k in set(files) | set(reference) if files.get(k) != reference.get(k))
            if differ:
                problems.append(
                    f"job-r{round_}: {len(differ)} files differ from the reference run: {differ[:5]}"
                )
            if finals[round_] == 0:
                problems += check_reported(root, files, args.rows, direct)
        roots = [f"{BUCKET}/reference", *jobs]
        from imagemill.core.write_audit import read_audit

        audit = read_audit(str(audit_path))
        audit_problems, figures["overlaps"] = check_audit(audit, roots)
        problems += audit_problems
        figures["audit_writes"] = len(audit)
        problems += [note for note in soak.notes if "kept running" in note]  # a hang is a failure
    finally:
        for driver in soak.drivers:
            if driver.alive():
                driver.process.send_signal(signal.SIGCONT)
                driver.process.kill()
                driver.process.wait()
        cluster.shutdown()
        proxy.stop()
        moto.stop()
    figures["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    section = results_section(args, soak, figures, problems)
    print(section)
    print("driver notes:\n  " + "\n  ".join(soak.notes[:40]))
    print(f"work folder: {work}" if args.keep else "")
    append_results(args.results, section)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
