"""Scheduling on the driver: a pool of ShardWorker actors, fed shard descriptors, handing back stats.

Each actor is kept two shards deep, and runs both calls at once, so it reads the next shard while
the model works on the current one, and starts it without waiting for the driver. An
actor that dies is replaced and its shards are queued again; a shard that fails is retried until it
has had `max_shard_attempts` tries, then reported as failed. A node being drained (a preemption
notice: imagemill.execution.drains) gets no new shard; its shards that cannot finish before its
deadline are handed back at once, without counting as a try, and its actors are replaced elsewhere.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import ray
from ray._private import ray_constants
from ray.exceptions import RayActorError, RayTaskError

from imagemill.core.compile_cache_key import compile_cache_env
from imagemill.core.cost import DeviceCharge, DeviceUse
from imagemill.core.device_ledger import AttemptFailed, FailedAttempt
from imagemill.core.errors import GangBroken, ImagemillError
from imagemill.core.records import ShardStats
from imagemill.core.shard import Shard
from imagemill.core.spec import JobSpec
from imagemill.core.write_gate import OwnedOutput
from imagemill.execution.budget import Budget
from imagemill.execution.drains import Drain, DrainWatch
from imagemill.execution.executor import Live, ShardFailure, ShardWork
from imagemill.execution.expanders import start_expanders, stop_expanders
from imagemill.execution.progress import poll_seconds
from imagemill.execution.replicas import Replica, start_replica
from imagemill.planning.pieces import serving_pieces
from imagemill.planning.placement import (
    ReplicaPlan,
    placeable_workers,
    replica_plan,
    replicas_in_cluster,
    room_outside,
)
from imagemill.workers.actors import ProgressTallyActor, ShardWorkerActor

log = logging.getLogger(__name__)
_NAMED_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit): ")
SHARDS_PER_ACTOR = 2
GROWTH_CHECK_SECONDS = 5.0
# While some of the actors started with the job are still loading the model, one that is ready takes at
# most its fair share of the shards (shards ÷ actors started), for this long after the first was ready
# (or as long as that one took to load, if longer): a fast loader must not take every shard of a small
# job and leave the other GPUs idle, and an actor that never loads (pending on a cluster that may grow)
# holds no one up for longer. A replacement (a lost node's, a dead actor's) never holds the others back.
SHARE_WAIT_SECONDS = 120.0


class RayExecutor:
    """The default shard executor (imagemill.execution.executor): the shards on a pool of actors of
    the cluster named by RAY_ADDRESS, or of a local one; pieces of row groups served by a PieceServer."""

    def __call__(self, work: ShardWork) -> None:
        _connect_ray()
        with serving_pieces(work.spec, work.shards) as served:
            scheduler = ShardScheduler(work.spec, work.output, on_ready=work.on_ready, budget=work.budget)
            scheduler.on_node_drained = work.on_node_drained
            for failure in scheduler.run(served, work.on_committed, work.on_attempt_failed, work.on_progress):
                work.on_failed(failure)

    def workers(self, spec: JobSpec) -> int:
        """`workers.num_workers`, or (joining the cluster to count them) one per GPU or CPU slot now."""
        if spec.workers.num_workers:
            return spec.workers.num_workers
        _connect_ray()
        return worker_count(spec, _plan(spec, _uses_gpu(spec)))


run_on_ray = RayExecutor()


def _connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or start a local one."""
    if not ray.is_initialized():
        # Actors' output stays in Ray's logs (errors name the folder); Ray's own INFO lines stay off.
        address = os.environ.get("RAY_ADDRESS") or None
        # The driver's core worker would install absl's failure signal handler, which prints a stack
        # dump ("*** SIGTERM received ... PC: @ ...") into the job's log on every `ray job stop` before
        # the clean exit (imagemill.cli: interrupted, 143). Off for this process only: Ray reads the
        # flag when the driver connects (its RAY_DISABLE_FAILURE_SIGNAL_HANDLER variable, read at
        # import, would also reach the actors of a local cluster, whose crash dumps stay useful).
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def _uses_gpu(spec: JobSpec) -> bool:
    if spec.model.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return spec.model.device == "cuda"


def _plan(spec: JobSpec, uses_gpu: bool) -> ReplicaPlan:
    workers = spec.workers
    return replica_plan(workers.num_cpus_per_worker, uses_gpu, workers.gpus_per_worker, spec.model.parallel)


def worker_count(spec: JobSpec, plan: ReplicaPlan) -> int:
    """The configured count, else the replicas the nodes hold: per node, its GPUs ÷ `gpus_per_worker`
    (its CPUs ÷ `num_cpus_per_worker` without GPUs)."""
    return spec.workers.num_workers or replicas_in_cluster(plan)


def ray_logs_dir() -> str:
    """The session log folder of the Ray node the driver runs on, where actors' output stays."""
    node = ray._private.worker.global_worker.node
    return node.get_logs_dir_path() if node is not None else "the Ray session's logs folder"


def _one_line(exc: BaseException) -> str:
    """The underlying error of a Ray exception, without Ray's traceback: 'OSError: no file ...'."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, RayActorError) and cause is not exc:
        return _one_line(cause)
    # The actor's own error, carried with the attempt's device time (imagemill.core.device_ledger).
    name = cause.error_type if isinstance(cause, AttemptFailed) else type(cause).__name__
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    # Ray ends an actor's death notice with the actor's own exception, already named.
    return last if _NAMED_EXCEPTION.match(last) else f"{name}: {last}"


def _save_load_error(exc: BaseException, run_id: str) -> str:
    """Write a failed model load's whole remote traceback into Ray's session log folder; its path.

    The user sees one line; the actor, which keeps the error for `ready()` instead of crashing, has
    printed nothing (a crashing actor's traceback and SIGABRT notice would bury that line).
    """
    folder = ray_logs_dir()
    if not os.path.isdir(folder):
        return folder
    path = os.path.join(folder, f"imagemill-{run_id}-model-load.log")
    with open(path, "w") as f:
        f.write(str(exc))
    return path


class ShardScheduler:
    """The actor pool of one job run: `run` is called once; its state is kept on the scheduler."""

    def __init__(
        self,
        spec: JobSpec,
        output: OwnedOutput,
        on_ready: Callable[[JobSpec], None],
        budget: Budget | None = None,
    ):
        """`output`: the output as this run holds it: checked before shards are handed out (a run that
        lost its lease stops at once) and by the actors before each shard and commit (its `run_id`);
        `on_ready`: called once the first workers have loaded the model, before any shard starts,
        with the spec the run uses (`workers.batch_size: auto` resolved by the first actor);
        `budget`: once it is reached no new shard is handed out (imagemill.execution.budget)."""
        self.spec = spec
        self.budget = budget
        self.output = output
        self.run_id = output.run_id
        self.on_ready = on_ready
        uses_gpu = _uses_gpu(spec)
        self.plan = _plan(spec, uses_gpu)
        self.actor_class = ray.remote(ShardWorkerActor)
        self.actor_options = {
            "num_cpus": spec.workers.num_cpus_per_worker,
            "num_gpus": self.plan.gpus_per_actor,
            "max_restarts": 0,  # the scheduler replaces dead actors and re-queues their shards itself
            # Both queued shards run at once: one reads while the other generates (model_turns.py).
            "max_concurrency": SHARDS_PER_ACTOR,
        }
        if env_vars := compile_cache_env(spec.speed):  # the key is in no spec or record: Ray carries it
            self.actor_options["runtime_env"] = {"env_vars": env_vars}
        self.num_workers = worker_count(spec, self.plan)  # replicas: a gang counts once
        self.replacements_left = 2 * self.num_workers + 2
        self.actors_started = 0
        self.run_token = uuid.uuid4().hex[:6]  # actor names must be unique across concurrent runs
        self.expanders: list[Any] = []  # the expander pool, with expansion.placement: pool
        # The state of `run` (one per scheduler):
        self.queue: deque[Shard] = deque()  # shards to hand out, retries at the back
        self.attempts: dict[str, int] = {}  # failed tries, by shard id (what max_shard_attempts counts)
        self.tries: dict[str, int] = {}  # attempts that committed nothing, handed back too: the ledger's key
        self.failures: list[ShardFailure] = []
        self.alive: list[Any] = []  # actors that loaded the model and take shards (a gang's leader)
        self.replicas: dict[Any, Replica] = {}  # each started actor (a gang's leader) → its replica
        # process_shard calls → (actor, shard, when it was handed out: time.monotonic())
        self.tasks: dict[ray.ObjectRef, tuple[Any, Shard, float]] = {}
        self.device_uses: dict[Any, DeviceUse] = {}  # each pool actor's devices, from its ready()
        self.last_report: dict[Any, float] = {}  # each actor's last shard call that answered
        self.starting: dict[ray.ObjectRef, Any] = {}  # ready() of actors not yet in the pool → the actor
        self.next_growth_check = 0.0
        self.report_every = min(GROWTH_CHECK_SECONDS, poll_seconds())  # how often progress is read
        self.next_report = 0.0
        self.tally: Any = None  # the run's ProgressTallyActor, started with the workers
        self.loaded_once = False  # until an actor loads the model, a load error ends the job
        self.warned: set[str] = set()  # the actors' device warnings already shown (`_warn_once`)
        self.taken: dict[int, int] = {}  # shards handed to each actor (by id(actor)), for the fair share
        self.share = 0  # an actor's fair share of the shards while the first actors load
        self.share_until = 0.0
        self.first_actors: set[ray.ObjectRef] = set()  # ready() of the actors started with the job
        self.started_at = 0.0
        self.drains = DrainWatch()
        self.driver_node: str | None = None  # the node this driver runs on (`run`)
        self.on_node_drained: Callable[[], None] = lambda: None  # the job record counts the drains
        self.node_of: dict[Any, str] = {}  # each pool actor's node, from its ready()
        self.committed_stats: list[ShardStats] = []  # this run's commits: how long a shard in flight has left
        self.drawn: dict[str, int] = {}  # images drawn in each running shard, as the tally last said
        self.stop_reason: str | None = None  # set when no node is left to run shards: none is handed out

    def _new_replica(self) -> Replica:
        """A replica (one actor or a gang: imagemill.execution.replicas) under a name the Ray dashboard
        shows: imagemill:<job>:<run>:<n>."""
        self.actors_started += 1
        name = f"imagemill:{self.spec.name}:{self.run_token}:{self.actors_started}"
        args = (self.spec, self.expanders, self.run_id, self.tally)
        replica = start_replica(self.actor_class, self.actor_options, self.plan, name, args)
        self.replicas[replica.leader] = replica
        return replica

    def _stop(self, actor: Any) -> None:
        """Stop an actor and, for a gang's leader, the rest of its gang and its placement group."""
        replica = self.replicas.pop(actor, None)
        if replica is not None:
            replica.stop()

    def _start_workers(self) -> None:
        """Start the pool: the actors that can be placed (imagemill.planning.placement) join it one by one
        as they load the model (`_join`), so work starts as soon as the first one is ready."""
        self.expanders = start_expanders(self.spec, f"imagemill:{self.spec.name}:{self.run_token}", _one_line)
        self.tally = ray.remote(ProgressTallyActor).options(num_cpus=0).remote()
        placed = placeable_workers(self.plan.demand, self.num_workers)
        log.info("%s", self.plan.line(placed))
        for _ in range(placed):
            self._start_actor()
        self.first_actors = set(self.starting)
        self.share = math.ceil(len(self.queue) / max(len(self.starting), 1))

    def _load_failed(self, exc: BaseException) -> None:
        """No actor has loaded the model and one could not: stop the job in one line."""
        for actor in self.starting.values():
            self._stop(actor)
        stop_expanders(self.expanders)
        raise ImagemillError(
            f"workers could not load model {self.spec.model.source}: {_one_line(exc)} "
            f"(full traceback: {_save_load_error(exc, self.run_id or self.run_token)})"
        ) from None

    def _report(self, on_progress: Callable[[Live], None], now: bool = False) -> None:
        """Every `report_every` seconds (or `now`): the workers loading and ready, and the rows drawn in
        each running shard as the tally has them, to `on_progress`. A tally that no longer answers
        leaves progress to the commits."""
        if not now and time.monotonic() < self.next_report:
            return
        self.next_report = time.monotonic() + self.report_every
        drawn: dict[str, int] = {}
        if self.tally is not None:
            try:
                drawn = ray.get(self.tally.snapshot.remote(), timeout=60)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("progress between commits is lost (%s); commits still count", _one_line(exc))
                self.tally = None
        self.drawn = drawn
        on_progress(Live(len(self.starting), len(self.alive), drawn))

    def run(
        self,
        shards: list[Shard],
        on_done: Callable[[ShardStats], None],
        on_attempt_failed: Callable[[str, FailedAttempt], None],
        on_progress: Callable[[Live], None] = lambda live: None,
    ) -> list[ShardFailure]:
        """Process every shard; returns the shards that failed all their attempts. `on_attempt_failed`
        gets every attempt that committed nothing, with its device time, before the next hand-out;
        `on_progress` the workers loading and ready and the rows drawn in running shards every
        `report_every` s.

        A replacement actor joins the pool only once it has loaded the model, so one that cannot be
        placed (its node is gone and no other has room) never holds shards: the others finish them.
        """
        self.queue.extend(shards)
        self.on_attempt_failed = on_attempt_failed
        self.started_at = time.monotonic()
        self.driver_node = ray.get_runtime_context().get_node_id()
        self._start_workers()
        self._report(on_progress, now=True)  # "loading the model on N workers…" at once
        self.next_growth_check = time.monotonic() + GROWTH_CHECK_SECONDS
        try:
            self._feed_all()
            while self.tasks or (self._to_hand_out() and self.starting):
                ready, _ = ray.wait([*self.tasks, *self.starting], num_returns=1, timeout=self.report_every)
                self.output.check()  # a run that lost its lease (a driver paused past it) stops here
                self._grow_with_cluster()
                self._report(on_progress)
                if ready:
                    [ref] = ready
                    if ref in self.starting:
                        self._join(ref)
                    else:
                        self._finish(ref, on_done)
                self._heed_drains()  # after the answer: the shards it hands back are no longer awaited
                self._feed_all()  # also on a timeout: the fair share may have lapsed (SHARE_WAIT_SECONDS)
                if self._to_hand_out() and not self.alive and not self.starting:
                    raise ImagemillError(
                        f"every worker died and no more replacements are allowed; {len(self.queue)} shards "
                        "were not run. Run the same command again to resume."
                    )
        finally:  # also when the run stops on a lost lease: its actors start nothing more
            for actor in [*self.alive, *self.starting.values()]:
                self._stop(actor)
            if self.tally is not None:
                ray.kill(self.tally)
            stop_expanders(self.expanders)
        return self.failures

    def _to_hand_out(self) -> bool:
        """Whether shards are queued, the budget, if any, is not reached, and nodes are left to run them."""
        return bool(self.queue) and not (self.budget and self.budget.reached()) and self.stop_reason is None

    def _feed_all(self) -> None:
        """Keep every live actor SHARDS_PER_ACTOR shards deep while there are shards to hand out, one
        shard at a time to the actor with the fewest running (an idle one first: a worker that just
        joined gets work before another's second shard), after checking that this run still holds the
        output."""
        if self._to_hand_out():
            self.output.check()
        while self._to_hand_out():
            open_actors = [
                actor
                for actor in self.alive
                if self._running(actor) < SHARDS_PER_ACTOR
                and self._within_share(actor)
                and self.drains.of(self.node_of.get(actor)) is None
            ]
            if not open_actors:
                return
            actor = min(open_actors, key=lambda a: (self._running(a), self.taken.get(id(a), 0)))
            shard = self.queue.popleft()
            self.tasks[actor.process_shard.remote(shard)] = (actor, shard, time.monotonic())
            self.taken[id(actor)] = self.taken.get(id(actor), 0) + 1

    def _running(self, actor: Any) -> int:
        return sum(1 for a, _, _ in self.tasks.values() if a is actor)

    def _within_share(self, actor: Any) -> bool:
        """Whether `actor` may take another shard now: always, unless actors started with the job are
        still loading and it has had its fair share (SHARE_WAIT_SECONDS)."""
        loading = any(ref in self.first_actors for ref in self.starting)
        if not loading or time.monotonic() >= self.share_until:
            return True
        return self.taken.get(id(actor), 0) < self.share

    def _join(self, ref: ray.ObjectRef) -> None:
        """An actor answered `ready`: it joins the pool; if it failed to load, the job stops when no
        actor has loaded yet (the model does not load), else another replacement is started. An actor
        that died of something else before it loaded (its node lost or drained, the process killed)
        says nothing about the model: it is replaced like one that died later."""
        actor = self.starting.pop(ref)
        try:
            ready = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            self._stop(actor)  # one that could not load its model is still alive (a gang whole)
            # `ready` raised, or the constructor (which loads the model) did: the model's own error.
            model_failed = isinstance(exc, RayTaskError) or exc.actor_init_failed
            if not self.loaded_once and model_failed:
                self._load_failed(exc)
            log.warning("a replacement worker failed to start: %s", _one_line(exc))
            self._start_replacement()
            return
        if self.spec.workers.batch_size == "auto":  # the first actor's probe fixes the job's value
            self.spec = self.spec.with_batch_size(ready["batch_size"])  # later actors probe nothing
        elif ready["batch_size"] != self.spec.workers.batch_size:
            self._stop(actor)  # probed in parallel and found another size: one given the job's value instead
            log.info(
                "a worker found batch size %d fits, not %d: starting one with %d",
                ready["batch_size"],
                self.spec.workers.batch_size,
                self.spec.workers.batch_size,
            )
            self._start_actor()
            return
        if not self.loaded_once:
            self.loaded_once = True
            now = time.monotonic()
            self.share_until = now + max(SHARE_WAIT_SECONDS, now - self.started_at)
            self.on_ready(self.spec)  # the job record is written now: a model that never loads leaves none
        self.alive.append(actor)
        self.device_uses[actor] = ready["device_use"]
        self.node_of[actor] = ready["node_id"]  # a replacement placed before its node's drain: _heed_drains
        split = (
            f", each image's tokens over {ready['token_slices']} processes"
            if ready["token_slices"] > 1
            else ""
        )
        log.info(
            "a worker is ready on %s (%d of %d): %s on node %s%s",
            ready["device"],
            len(self.alive),
            self.num_workers,
            ready["name"],
            ready["node_id"][:8],
            split,
        )
        self._warn_once(ready["warnings"])

    def _warn_once(self, warnings: list[str]) -> None:
        """Show each setting an actor found slow or unsupported on its device
        (imagemill.workers.device_warnings) as one warning line, once per run whatever the actors."""
        for line in warnings:
            if line not in self.warned:
                self.warned.add(line)
                log.warning("%s", line)

    def _finish(self, ref: ray.ObjectRef, on_done: Callable[[ShardStats], None]) -> None:
        """A shard call returned: its stats go to `on_done`; a failed shard is retried, and a dead
        actor replaced."""
        actor, shard, handed_out = self.tasks.pop(ref)
        if self.tally is not None:
            self.tally.forget.remote(shard.shard_id)
        try:
            stats = ray.get(ref)
        except RayActorError as exc:
            # Its other attempts died with it: the span since the earliest of them is charged once.
            since = min([handed_out, *(at for a, _, at in self.tasks.values() if a is actor)])
            if actor in self.alive:
                self.alive.remove(actor)
                self._stop(actor)  # the whole replica: a gang's survivors with it
                self._heed_drains(after_death=True)  # a drained node's going is not the shard's fault
                if self.stop_reason is None:
                    log.warning("a worker died (%s); starting a replacement", _one_line(exc))
                    self._start_replacement()
            drain = self.drains.of(self.node_of.get(actor)) or self.drains.of(self.driver_node)
            error = (
                f"handed back: node {drain.short} was drained" if drain else f"worker died: {_one_line(exc)}"
            )
            self._attempt_failed(shard, error, self._unreported(actor, since), handed_back=drain is not None)
        except RayTaskError as exc:
            cause = exc.cause
            charge = cause.charge if isinstance(cause, AttemptFailed) else self._unreported(actor, handed_out)
            self.last_report[actor] = time.monotonic()
            self._attempt_failed(shard, _one_line(exc), charge, reported=isinstance(cause, AttemptFailed))
            if isinstance(cause, AttemptFailed) and cause.error_type == GangBroken.__name__:
                self._lost(actor, f"a gang broke ({_one_line(exc)})")
        else:
            self.last_report[actor] = time.monotonic()
            self.committed_stats.append(stats)
            on_done(stats)

    def _lost(self, actor: Any, why: str) -> None:
        """A pool actor died, or its gang broke: it leaves the pool, the whole replica is stopped (a
        gang's survivors with it) and a replacement is placed. Its other running shard comes back as a
        dead actor's, once, after this (no second replacement)."""
        if actor in self.alive:
            log.warning("%s; starting a replacement", why)
            self.alive.remove(actor)
            self._stop(actor)
            self._start_replacement()

    def _unreported(self, actor: Any, since: float) -> DeviceCharge:
        """An attempt that ended without the actor's report of its device time: the wall-clock the
        actor's devices were held for it, from the later of `since` and the actor's last report to
        now (imagemill.core.device_ledger says so)."""
        now = time.monotonic()
        start = max(since, self.last_report.get(actor, since))
        self.last_report[actor] = now
        return self.device_uses[actor].charge(now - start)

    def _attempt_failed(
        self,
        shard: Shard,
        error: str,
        charge: DeviceCharge,
        reported: bool = False,
        handed_back: bool = False,
    ) -> None:
        """Record a failed attempt's device time (before anything else is handed out, so the budget
        counts it), then retry the shard or give it up; a shard `handed_back` (its node is going: not
        the shard's fault) goes to the front of the queue and keeps its tries."""
        tries = self.tries[shard.shard_id] = self.tries.get(shard.shard_id, 0) + 1
        attempt = FailedAttempt(
            run_id=self.run_id,
            attempt=tries,
            ended_at=datetime.now(UTC).isoformat(),
            error=error,
            reported=reported,
            charge=charge,
        )
        self.on_attempt_failed(shard.shard_id, attempt)
        if handed_back:
            self.queue.appendleft(shard)
        else:
            self._retry_or_fail(shard, error)

    def _retry_or_fail(self, shard: Shard, error: str) -> None:
        attempts = self.attempts[shard.shard_id] = self.attempts.get(shard.shard_id, 0) + 1
        if attempts < self.spec.workers.max_shard_attempts:
            log.warning("shard %s failed (%s); it will be tried again", shard.shard_id, error)
            self.queue.append(shard)
        else:
            self.failures.append(ShardFailure(shard.shard_id, shard.file_url, attempts, error))

    def _heed_drains(self, after_death: bool = False) -> None:
        """Every DRAIN_CHECK_SECONDS: each node newly being drained gets one line and a count in the job
        record; then, on every draining node, a pool actor whose shards cannot all finish before the
        node's deadline is stopped and its shards handed back, and one left without shards is stopped
        (the node may go early); each is replaced, and Ray places no new actor on a draining node.
        With no node left to take a worker, no more shards are handed out (`stop_reason`); nor when the
        driver's own node is drained. `after_death`: asked at once, nodes already gone after a drain too."""
        if not (after_death or self.drains.due()):
            return
        for drain in self.drains.new_drains(gone_too=after_death):
            self.on_node_drained()
            if drain.node_id == self.driver_node:
                self._stop_for_driver_node(drain)
                continue
            on_node = [actor for actor in self.alive if self.node_of.get(actor) == drain.node_id]
            running = [shard.shard_id for a, shard, _ in self.tasks.values() if a in on_node]
            back = [shard_id for actor in on_node if not self._finishes_before(actor, drain) for shard_id in
                    self._hand_back(actor, drain)]  # fmt: skip
            kept = sorted(set(running) - set(back))
            log.warning(
                "node %s is being drained (%s; Ray gives the reason only once the node is gone): "
                "no new shard for its workers (%d); handed back: %s; finishing there: %s",
                drain.short,
                drain.when(),
                len(on_node),
                ", ".join(sorted(back)) or "none",
                ", ".join(kept) or "none",
            )
        for actor in list(self.alive):
            drain = self.drains.of(self.node_of.get(actor))
            if drain is None or actor not in self.alive:
                continue
            if not self._running(actor):
                self._retire(actor)
            elif not self._finishes_before(actor, drain):  # the estimate grew, or the deadline passed
                log.warning(
                    "shards %s handed back: node %s's deadline is too near",
                    self._shard_ids(actor),
                    drain.short,
                )
                self._hand_back(actor, drain)
        if self.drains.seen and self.stop_reason is None:
            self._stop_if_no_node_left()

    def _finishes_before(self, actor: Any, drain: Drain) -> bool:
        """Whether `actor`'s shards in flight should finish before `drain`'s deadline: the images they
        have left to draw (the tally's counts) at this run's seconds per committed image, one shard
        after another (the model is held in turn). Conservative: a shard's seconds include its wait for
        the model. Without a commit to measure by, only a drain without deadline waits."""
        mine = [shard for a, shard, _ in self.tasks.values() if a is actor]
        if not mine or drain.deadline is None:
            return True
        images = math.fsum(stats.rows for stats in self.committed_stats)
        if not images:
            return False
        per_image = math.fsum(stats.seconds for stats in self.committed_stats) / images
        left = sum(
            max(0, shard.num_rows * self.spec.images_per_row - self.drawn.get(shard.shard_id, 0))
            for shard in mine
        )
        return left * per_image < drain.seconds_left()

    def _shard_ids(self, actor: Any) -> str:
        return ", ".join(sorted(shard.shard_id for a, shard, _ in self.tasks.values() if a is actor))

    def _hand_back(self, actor: Any, drain: Drain) -> list[str]:
        """Stop `actor` and put its shards in flight back at the front of the queue, without a try
        counted; their device time is charged as an attempt that died (imagemill.core.device_ledger).
        What they staged is never published (its run's `_staging` is cleaned at the end)."""
        mine = [(ref, shard, at) for ref, (a, shard, at) in self.tasks.items() if a is actor]
        self._retire(actor)  # killed before its shards are queued again
        since = min((at for _, _, at in mine), default=time.monotonic())
        for ref, shard, _ in mine:
            del self.tasks[ref]
            if self.tally is not None:
                self.tally.forget.remote(shard.shard_id)
            error = f"handed back: node {drain.short} is being drained ({drain.when()})"
            self._attempt_failed(shard, error, self._unreported(actor, since), handed_back=True)
        return [shard.shard_id for _, shard, _ in mine]

    def _retire(self, actor: Any) -> None:
        """Take `actor` (on a draining node) out of the pool and start a replacement, placed elsewhere
        (none once the run stops)."""
        self._stop(actor)  # the whole replica
        self.alive.remove(actor)
        if self.stop_reason is None:
            self._start_actor()

    def _stop_for_driver_node(self, drain: Drain) -> None:
        """The driver's node is drained: Ray releases it at once (a driver is no work to it), and every
        actor the driver owns dies with it. Every shard in flight is handed back and the run ends,
        incomplete, with one line; the same command, from a node that stays, resumes it."""
        self.stop_reason = f"the node this driver runs on ({drain.short}) is being drained"
        running = [shard.shard_id for _, shard, _ in self.tasks.values()]
        for actor in list(self.alive):
            self._hand_back(actor, drain)
        log.warning(
            "%s (%s): every worker stops with it; handed back: %s; run the same command again, from a node "
            "that stays, to resume",
            self.stop_reason,
            drain.when(),
            ", ".join(sorted(running)) or "none",
        )

    def _stop_if_no_node_left(self) -> None:
        """With shards to run, no pool actor off a draining node, and no node outside them that can take
        a worker (now, or once the cluster grows), nothing more is handed out: the run ends incomplete,
        with one line, and running it again resumes it."""
        draining = frozenset(self.drains.seen)
        if not self._to_hand_out() or any(self.node_of.get(actor) not in draining for actor in self.alive):
            return
        if room_outside(self.plan.demand, draining):
            return
        self.stop_reason = "every node that can run a worker is being drained"
        log.warning(
            "%s; %d shards not run (committed ones are kept): run the same command again to resume once "
            "the cluster has nodes",
            self.stop_reason,
            len(self.queue),
        )

    def _start_actor(self) -> None:
        """Start an actor; it joins the pool once its `ready` answers (`_join`)."""
        replica = self._new_replica()
        self.starting[replica.ready] = replica.leader

    def _start_replacement(self) -> None:
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._start_actor()

    def _grow_with_cluster(self) -> None:
        """With num_workers unset, nodes that join the cluster (autoscaling) get actors too.

        Looked at every GROWTH_CHECK_SECONDS, not after every shard: it asks the GCS each time.
        """
        if self.spec.workers.num_workers is not None or time.monotonic() < self.next_growth_check:
            return
        self.next_growth_check = time.monotonic() + GROWTH_CHECK_SECONDS
        room = worker_count(self.spec, self.plan) - len(self.alive) - len(self.starting)
        if self._to_hand_out() and room > 0:
            log.info("the cluster grew: starting %d more workers", room)
            for _ in range(room):
                self._start_actor()
