"""The classes the driver starts as Ray actors: shells that import the actor runtime only once they
run inside the actor's process.

Ray pickles an actor class by reference, so the driver must import the class it starts. Were that
`ShardWorker` itself, every driver (`imagemill run`, a submitted job's entrypoint) would import torch
and the model libraries first: seconds of start-up on a machine that never runs a model. The driver
imports this module; the actor imports `worker.py` (or `stages/expansion.py`, `pieces.py`) when it is
created. This module is the only part of `imagemill.workers` the driver imports (the import contracts in
pyproject.toml).
"""

from __future__ import annotations

from typing import Any

from imagemill.core.records import ShardStats
from imagemill.core.shard import Shard
from imagemill.core.spec import EvaluationSpec, ExpansionSpec, InputSpec, JobSpec


class ShardWorkerActor:
    """`ShardWorker` (worker.py) as the scheduler's actor: `ready` once the model is loaded, then
    `process_shard` for each shard handed out; in a gang, `join_gang` instead of `ready`, and the
    followers get `follow_shard` from their leader."""

    def __init__(
        self,
        spec: JobSpec,
        expanders: list[Any] | None = None,
        run_id: str | None = None,
        tally: Any = None,
    ):
        """`tally`: the run's `ProgressTallyActor`, told after each batch (a call not waited for)."""
        import ray

        from imagemill.workers.worker import ShardWorker

        on_batch = None if tally is None else lambda shard_id, rows: tally.drawn.remote(shard_id, rows)
        self.worker = ShardWorker(spec, expanders, run_id, on_batch)
        self.worker.name = ray.get_runtime_context().get_actor_name()  # which worker committed a shard

    def ready(self) -> dict[str, Any]:
        """The worker's ready answer, with its name and the node it runs on (the driver heeds that
        node's drain, and its log line names both)."""
        import ray

        return {
            **self.worker.ready(),
            "name": self.worker.name,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def process_shard(self, shard: Shard) -> ShardStats:
        return self.worker.process_shard(shard)

    # A context-parallel gang's member (imagemill.execution.replicas starts them, workers/gang.py joins them).

    def gang_address(self) -> str:
        """On the leader: host:port for the gang's rendezvous."""
        from imagemill.workers.gang import free_address

        return free_address()

    def join_gang(self, address: str, rank: int, world_size: int, followers: list[Any]) -> dict[str, Any]:
        """Join the gang, then load (`ready`'s answer); the leader is given its followers' handles."""
        self.worker.join_gang(address, rank, world_size, followers)
        return self.ready()

    def follow_shard(self, shard: Shard, batch_size: int) -> int:
        """On a follower: the leader's shard, drawn in step with it, nothing written."""
        return self.worker.follow_shard(shard, batch_size)


class ProgressTallyActor:
    """The run's one tally of rows drawn in the shards being run: each worker sets its shard's count
    after every batch without waiting for an answer, and the driver reads every count at once every
    few seconds. Small counts only pass through it, and a worker never waits on it."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def drawn(self, shard_id: str, rows: int) -> None:
        self.counts[shard_id] = rows

    def forget(self, shard_id: str) -> None:
        """The shard's call returned (committed or failed): its count is no longer the driver's to show."""
        self.counts.pop(shard_id, None)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class PromptExpanderActor:
    """`PromptExpander` (stages/expansion.py) as an actor of the expander pool (`placement: pool`)."""

    def __init__(self, spec: ExpansionSpec, device: str):
        from imagemill.workers.stages.expansion import PromptExpander

        self.expander = PromptExpander(spec, device)

    def ready(self) -> str:
        return self.expander.ready()

    def expand(self, prompts: list[str], seeds: list[int]) -> list[str]:
        return self.expander.expand(prompts, seeds)


class PieceServerActor:
    """`PieceServer` (pieces.py) as the run's one reader of row groups cut into pieces
    (imagemill.planning.pieces starts it); it reads the columns the job's rows use."""

    def __init__(self, spec: InputSpec, pieces: list[tuple[str, int, int]]):
        from imagemill.workers.pieces import PieceServer
        from imagemill.workers.rows import input_columns

        self.server = PieceServer(spec, input_columns(spec), pieces)

    def piece(self, url: str, group: int, offset: int, num_rows: int) -> bytes:
        return self.server.piece(url, group, offset, num_rows)

    def stats(self) -> dict[str, int]:
        return self.server.stats()


def feature_model(spec: EvaluationSpec, device: str) -> Any:
    """The evaluation's feature model (stages/evaluation.py), for the one place the driver embeds images
    itself: the reference set (imagemill.evaluation.reference), imported only when that runs."""
    from imagemill.workers.stages.evaluation import FeatureModel

    return FeatureModel(spec, device)
