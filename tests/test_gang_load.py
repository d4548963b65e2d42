"""A gang member whose model does not load (a follower's GPU out of memory, say) fails its replica's
start at once, with that member's error on the leader's `ready`, which the driver reads: not the
leader's first step, which waited GANG_TIMEOUT (120 s) for a member that would never draw. Two real
processes meet over gloo, as a gang's actors do (workers/gang.py)."""

from __future__ import annotations

from pathlib import Path

import torch.multiprocessing as mp

PLANTED = "CUDA out of memory (planted on rank 1)"


def _member(rank: int, address: str, out: str) -> None:
    """One gang member: joins, loads (rank 1's load fails), and writes what its `ready` said."""
    import torch

    import imagemill
    from imagemill.workers.worker import ShardWorker

    torch.set_num_threads(1)
    spec = imagemill.build_spec(
        {
            "input": {"path": out},
            "output": {"path": f"{out}/out"},
            "model": {"kind": "noop", "parallel": "context"},
            "workers": {"gpus_per_worker": 2},
        }
    )
    if rank == 1:

        def failing(self, *args):
            raise RuntimeError(PLANTED)

        ShardWorker._load = failing
    worker = ShardWorker(spec)
    try:
        said = f"ready: {worker.join_gang(address, rank, 2, [])}"
    except Exception as exc:
        said = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(said)


def test_a_member_that_does_not_load_fails_the_leaders_ready_with_its_error(tmp_path):
    from imagemill.workers.gang import free_address

    mp.spawn(_member, args=(free_address(), str(tmp_path)), nprocs=2)
    leader, follower = ((tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1))
    assert follower == f"RuntimeError: {PLANTED}", follower
    assert leader == f"ImagemillError: gang member 1 of 2: RuntimeError: {PLANTED}", leader
