"""This replica's process group: the one place a context-parallel gang's actors meet.

A replica of `workers.gpus_per_worker: N` with `model.parallel: context` is N actors, one per GPU of
one node (imagemill.execution.replicas places them). Each joins one torch.distributed process group
(nccl on CUDA, gloo elsewhere) at the leader's address, rank 0 the leader. The leader reads and
writes the shard; for each shard it takes the model, it sends the same shard to every follower,
which draws the same rows with the same seeds (with prompt expansion, from the leader's expanded
prompts, sent before each batch by `agree_prompts`: only the leader expands), and after each batch
all members all-reduce the rows they drew (`step`): the leader checks every member drew the batch,
so a member out of step or dead fails the attempt with `GangBroken` instead of hanging, and the
driver re-places the gang. After loading, the members tell each other whether they loaded
(`agree_loaded`), so a follower's model that does not load fails the replica's start, the leader's
`ready`, with that follower's error, not the leader's first step after GANG_TIMEOUT.

A generator splitting an image's work over the gang (branch `parallel`) takes the group from
`replica_group()`, whose world size is the replica's GPUs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from imagemill.core.errors import GangBroken, ImagemillError
from imagemill.core.shard import Shard
from imagemill.workers.rows import Row

# How long a member waits for the others: to join (the slowest to load the model), then in each
# collective; past it the attempt fails as a broken gang.
GANG_TIMEOUT = timedelta(seconds=120)
_joined: Gang | None = None  # this process's gang, once joined


def free_address() -> str:
    """host:port where the leader will take the group's rendezvous (a port free on its node now)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def replica_group() -> Any:
    """This replica's process group (None outside a gang): what a context-parallel model splits over."""
    return None if _joined is None else dist.group.WORLD


class Gang:
    """This actor's place in its gang: its rank, the group's size and, on the leader, the followers."""

    def __init__(self, address: str, rank: int, world_size: int, device: str, followers: list[Any]):
        global _joined
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device).index or 0)  # Ray shows the actor its GPU only
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=world_size,
            timeout=GANG_TIMEOUT,
        )
        self.rank = rank
        self.world_size = world_size
        self.device = device if cuda else "cpu"
        self.followers = followers
        _joined = self

    def agree_loaded(self, error: Exception | None) -> None:
        """After each member's load, on every member: raise, on each member that loaded, the first
        load error of another (`error`: this member's own, None when it loaded), naming its rank."""
        errors: list[str | None] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        try:
            dist.all_gather_object(errors, mine)
        except RuntimeError as exc:
            raise GangBroken(f"a gang member is gone: {exc}") from exc
        if error is None:
            for rank, theirs in enumerate(errors):
                if theirs is not None:
                    raise ImagemillError(f"gang member {rank} of {self.world_size}: {theirs}")

    def step(self, rows: int) -> None:
        """After each batch, on every member: all-reduce the rows drawn; the leader checks that each
        member drew the batch."""
        drawn = torch.tensor([rows], dtype=torch.int64, device=self.device)
        try:
            dist.all_reduce(drawn)
        except RuntimeError as exc:  # gloo's and nccl's errors (DistBackendError too)
            raise GangBroken(f"a gang member is gone: {exc}") from exc
        if self.rank == 0 and int(drawn.item()) != rows * self.world_size:
            raise GangBroken(
                f"the gang drew {int(drawn.item())} rows of a {rows}-row batch on {self.world_size} members"
            )

    def agree_prompts(self, rows: list[Row]) -> None:
        """Before a batch, on every member: the leader's expanded prompts of the batch's rows, set on
        the followers' rows. Every member draws a share of each image's work, so all must condition
        on the same text, and only the leader expands (sampled by a language model on its device)."""
        texts = [row.expanded_prompt for row in rows]
        try:
            dist.broadcast_object_list(texts, src=0, device=torch.device(self.device))
        except RuntimeError as exc:
            raise GangBroken(f"a gang member is gone: {exc}") from exc
        for row, text in zip(rows, texts, strict=True):
            row.expanded_prompt = text

    @contextmanager
    def leading(self, shard: Shard, batch_size: int) -> Iterator[None]:
        """On the leader, around its generate loop: the followers run the same shard in step, cut into
        the leader's batches (`batch_size: auto` is the leader's probe). Anything failing in it fails
        the gang (the followers would wait for a step that never comes)."""
        calls = [follower.follow_shard.remote(shard, batch_size) for follower in self.followers]
        try:
            yield
            ray.get(calls, timeout=GANG_TIMEOUT.total_seconds())
        except GangBroken:
            raise
        except Exception as exc:  # one line: Ray's errors run to many, the driver shows the last
            detail = (str(exc).strip().splitlines() or [""])[-1]
            raise GangBroken(
                f"the gang fell out of step in shard {shard.shard_id}: {type(exc).__name__}: {detail}"
            ) from exc
