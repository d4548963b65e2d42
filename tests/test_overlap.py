"""An actor reads its next shard while the model works on the current one, and hands the model from
shard to shard one at a time, in the order the calls took their tickets; each shard's stats say where
time went.

The two calls the actor holds run on two threads, and Ray does not order a threaded actor's calls, so
which of the first two shards takes the first ticket is up to the threads: the end-to-end test checks
overlap and one holder at a time, and the ticket order is checked on ModelTurns itself."""

from __future__ import annotations

import logging
import threading
import time

from conftest import write_prompt_files

import imagemill
from imagemill.core.layout import OutputLayout
from imagemill.core.records import ShardStats, committed_shards
from imagemill.core.stage_table import MODEL_STAGES
from imagemill.workers.model_turns import ModelTurns
from imagemill.workers.stage_timer import STAGES


def test_next_shard_is_read_while_the_model_works_and_stages_are_recorded(
    ray_session, tmp_path, tiny_model, caplog
):
    write_prompt_files(str(tmp_path / "prompts"), n_files=1, rows_per_file=36, row_group_size=12)
    spec = imagemill.build_spec(
        {
            "name": "overlap",
            "input": {"path": str(tmp_path / "prompts"), "rows_per_shard": 12},
            "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model},
            "generation": {"width": 32, "height": 32, "num_inference_steps": 2, "guidance_scale": 5.0},
            "workers": {"num_workers": 1, "batch_size": 4},
        }
    )
    caplog.set_level(logging.INFO, logger="imagemill.execution.runner")
    result = imagemill.run(spec, progress=False)
    assert result.complete and result.ok == 36

    shards = sorted(committed_shards(OutputLayout(str(tmp_path / "out"))).values(), key=lambda s: s.shard_id)
    by_turn = sorted(shards, key=lambda stats: stats.timeline["model"][0])
    first, second = by_turn[:2]  # both sent at the start: the actor holds two calls from then on
    assert second.timeline["read"][0] < first.timeline["model"][1], "shard 2 was read during shard 1's"
    for current, following in zip(by_turn, by_turn[1:], strict=False):
        assert following.timeline["model"][0] >= current.timeline["model"][1], "one holder at a time"

    assert not {"read_seconds", "generate_seconds"} & set(ShardStats.model_fields), "none repeats stages"
    for stats in shards:
        stages = stats.stage_seconds
        assert set(stages) == set(STAGES)
        assert all(seconds >= 0 for seconds in stages.values())
        for stage in ("read", "text_encode", "denoise", "decode", "image_encode", "upload"):
            assert stages[stage] > 0, (stage, stages)
        # the model's stages and the post-generation stages run while it is held (core/stage_table.py)
        model_seconds = sum(stages[stage] for stage in MODEL_STAGES)
        assert set(MODEL_STAGES) >= {"text_encode", "denoise", "decode", "copy_back"}
        [line] = [line for line in caplog.messages if line.startswith(f"shard {stats.shard_id} done:")]
        assert f"12 rows, 12 ok, 0 error in {stats.seconds:.1f} s" in line  # the driver's INFO line
        assert f"read {stages['read']:.1f} s, generate {model_seconds:.1f} s, " in line, line
        assert f"waiting on writes {stats.write_wait_seconds:.1f} s)" in line, line


def test_the_model_goes_to_tickets_in_order_and_a_given_up_ticket_is_skipped():
    turns = ModelTurns()
    held: list[int] = []
    tickets = [turns.ticket() for _ in range(4)]
    places = [ticket.__enter__() for ticket in tickets]  # numbers 0..3, in this order

    def take(index: int) -> None:
        with places[index]:
            held.append(index)
            time.sleep(0.01)
        tickets[index].__exit__(None, None, None)

    threads = [threading.Thread(target=take, args=(i,)) for i in (3, 1, 0)]  # started out of order
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    assert held == [0, 1], "turn 3 must wait for turn 2"
    tickets[2].__exit__(None, None, None)  # call 2 failed before its turn: it gives its place up
    for thread in threads:
        thread.join(timeout=5)
    assert held == [0, 1, 3]
