"""`workers.gpus_per_worker` before any actor starts: which values the spec takes, what a replica asks
Ray for, how many replicas a node holds, and the placement line. Ray-free, fast tier; the cluster
side is tests/test_gpu_placement.py."""

from __future__ import annotations

import math

import pytest
import yaml
from doc_pages import blocks, section
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.spec import WorkersSpec
from imagemill.planning.placement import ReplicaPlan, replica_plan


def _spec(**workers) -> imagemill.JobSpec:
    return imagemill.build_spec(
        {"input": {"path": "p"}, "output": {"path": "o"}, "model": {"kind": "noop"}, "workers": workers}
    )


def _taken(value: float) -> bool:
    try:
        WorkersSpec(gpus_per_worker=value)
    except ValidationError:
        return False
    return True


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64))
def test_a_share_of_one_gpu_and_whole_gpus_are_taken(n):
    assert math.isclose(WorkersSpec(gpus_per_worker=1 / n).gpus_per_worker * n, 1.0)
    assert WorkersSpec(gpus_per_worker=n).gpus_per_worker == n


@settings(max_examples=40, deadline=None)
@given(
    st.floats(-1, 16)
    | st.sampled_from([math.nan, math.inf, 1 / 3, 0.2, 2.0, 1e300, 5e-324, 1 / 10000, 1 / 10001])
)
def test_nothing_else_is_taken(value):
    share = 0.0001 <= value < 1 and math.isclose(value * round(1 / value), 1.0)
    whole = math.isfinite(value) and value >= 1 and value == int(value)
    assert _taken(value) == (share or whole)


@pytest.mark.parametrize("value", [0.3, 2.5, 0, 5e-324, float("nan"), float("inf"), "half"])
def test_a_refused_number_of_gpus_is_one_line_naming_the_setting(value):
    with pytest.raises(ImagemillError) as refused:
        _spec(gpus_per_worker=value)
    message = str(refused.value)
    assert "workers.gpus_per_worker" in message and "\n" not in message


@settings(max_examples=40, deadline=None)
@given(
    gpus=st.sampled_from([0.125, 0.25, 0.5, 1, 2, 4, 8]), context=st.booleans(), node_gpus=st.integers(0, 16)
)
def test_a_node_holds_floor_its_gpus_over_a_replicas_and_a_gang_asks_for_them_all_at_once(
    gpus, context, node_gpus
):
    plan = replica_plan(2, True, gpus, "context" if context else "components")
    gang = context and gpus > 1
    assert (plan.members, plan.gpus_per_actor) == ((int(gpus), 1) if gang else (1, gpus))
    assert plan.gpus == gpus and plan.demand.num_gpus == gpus
    assert plan.demand.num_cpus == 2 * plan.members  # each member's CPUs, on the same node
    assert plan.replicas_on({"CPU": 64, "GPU": node_gpus}) == math.floor(node_gpus / gpus)


def test_the_placement_line_says_replicas_gpus_and_actors_per_gpu():
    assert (
        replica_plan(1, True, 2, "context")
        .line(2)
        .startswith("placement: 2 replicas × 2 GPUs (gang of 2), 1 actor per GPU; components:")
    )
    assert (
        replica_plan(1, True, 0.5, "components")
        .line(4)
        .startswith("placement: 4 actors on 2 GPUs (0.5 GPU each, 2 per GPU); components:")
    )
    assert (
        replica_plan(1, True, 4, "components")
        .line(1)
        .startswith("placement: 1 replica × 4 GPUs, 1 actor per replica; components: spread over its 4 GPUs")
    )
    assert replica_plan(1, True, 1, "components").line(3).startswith("placement: 3 actors × 1 GPU")
    assert replica_plan(2, False, 0.5, "context") == ReplicaPlan(2, 0)  # a CPU job: no GPU asked for


def test_the_cluster_guides_example_is_a_gang_of_two():
    [example] = blocks(section("docs/cluster.md", "GPUs per worker"), "yaml")
    spec = imagemill.build_spec({"input": {"path": "p"}, "output": {"path": "o"}, **yaml.safe_load(example)})
    plan = replica_plan(1, True, spec.workers.gpus_per_worker, spec.model.parallel)
    assert (plan.members, plan.gpus_per_actor) == (2, 1)
