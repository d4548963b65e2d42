"""A model replica as the scheduler starts and stops it: one actor, or a gang of actors on one node.

A context-parallel replica (imagemill.planning.placement's ReplicaPlan with several members) is a
placement group of one {GPU: 1, CPU: c} bundle per member, STRICT_PACK so that it lands on one node
(pending, it is the autoscaler's request for a node of that shape), and one actor per bundle. The
members join one torch.distributed process group (imagemill.workers.gang) at the leader's address,
rank 0 the leader: the only member the scheduler hands shards to; it runs them in step with the
others. The gang lives and dies whole: `stop` kills every member and removes the placement group, so
a replacement is placed from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from imagemill.planning.placement import ReplicaPlan


@dataclass
class Replica:
    """One replica's actors: `leader` takes the shards; `ready` answers once every member loaded."""

    leader: Any
    ready: ray.ObjectRef
    followers: list[Any] = field(default_factory=list)
    group: PlacementGroup | None = None

    def stop(self) -> None:
        """Kill every member (one stuck in a collective with a dead one too) and free the bundles."""
        for actor in [self.leader, *self.followers]:
            ray.kill(actor)
        if self.group is not None:
            remove_placement_group(self.group)


def start_replica(
    actor_class: Any, options: dict[str, Any], plan: ReplicaPlan, name: str, args: tuple
) -> Replica:
    """Start one replica of `plan` under `name` (a gang's followers as `name.1`, `name.2`, ...)."""
    if plan.members == 1:
        leader = actor_class.options(name=name, **options).remote(*args)
        return Replica(leader, leader.ready.remote())
    bundle = {"CPU": plan.num_cpus, "GPU": plan.gpus_per_actor}
    group = placement_group([bundle] * plan.members, strategy="STRICT_PACK", name=name)
    members = [
        actor_class.options(
            name=name if rank == 0 else f"{name}.{rank}",
            **{
                **options,
                # a follower runs its shard calls one at a time, in the order the leader sends them
                "max_concurrency": options["max_concurrency"] if rank == 0 else 1,
            },
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote(*args)
        for rank in range(plan.members)
    ]
    leader, followers = members[0], members[1:]
    address = leader.gang_address.remote()  # passed on unresolved: the driver waits for nothing here
    joined = [
        member.join_gang.remote(address, rank, plan.members, followers if rank == 0 else [])
        for rank, member in enumerate(members)
    ]
    return Replica(leader, joined[0], followers, group)
