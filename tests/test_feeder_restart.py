"""A data feeder that Ray restarted gets the requests that were in flight again, from ranks one
batch apart; it serves each the rows it asked for, whatever order they arrive in. (The drill,
killing the feeder actor during a run, is in tests/test_elastic.py.)"""

import itertools
import threading

import numpy as np
import pytest

from raytitan.components.data.stream import Cursor, global_batches, local_rows
from raytitan.components.data.synthetic import ensure_synthetic_shards
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.config.job import Model
from raytitan.ray import data_feed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_shards(str(tmp_path_factory.mktemp("feed")), seed=0, num_shards=2, docs_per_shard=8)


@pytest.mark.parametrize("first", [4, 5])
def test_a_restarted_feeder_serves_ranks_one_batch_apart(shards, monkeypatch, first):
    # The pipeline computed in this process (the same rows Ray Data yields: tests/data/test_ray_feed.py),
    # held until both requests are in, as a pipeline starting up is.
    both_in = threading.Event()

    def rows(shards, model, seq_len, seed, start, shuffle_block=0, **pipeline):
        both_in.wait(30)
        yield from local_rows(shards, ByteTokenizer(), seq_len, seed, start)

    monkeypatch.setattr(data_feed, "ray_rows", rows)
    expected = list(itertools.islice(global_batches(local_rows(shards, ByteTokenizer(), 63, 0, Cursor()), 8,
                                                    Cursor()), 7))
    feeder = data_feed.DataFeeder(shards, Model(), 63, 0, 8)  # fresh: as Ray starts it again
    # Rank 1's request for batch 4 and rank 0's for batch 5, sent again by Ray (neither a reset).
    wanted = {4: 1, 5: 0}
    got = {}

    def ask(k: int) -> None:
        got[k] = feeder.get(expected[k].start.as_list(), wanted[k], 2)

    threads = []
    for k in (first, 9 - first):
        threads.append(threading.Thread(target=ask, args=(k,), daemon=True))
        threads[-1].start()
        threads[-1].join(0.05)  # the first request is in before the second
    both_in.set()
    for t in threads:
        t.join(10)
    assert sorted(got) == [4, 5], "a request waited forever: the other one restarted the pipeline under it"
    for k, rank in wanted.items():
        tokens, ids, end, _ = got[k]
        np.testing.assert_array_equal(ids, expected[k].rows_for(rank, 2)[1])
        assert Cursor(*end) == expected[k].end


def test_a_group_restarted_from_a_recent_step_is_served_again_without_a_pipeline_restart(shards, monkeypatch):
    """Batches the ranks moved past stay (``replay``): a group restarted from a recent checkpoint
    asks for them again with the same rows, and the pipeline goes on; a cursor further back than
    the window restarts it, also with the same rows."""
    monkeypatch.setattr(data_feed, "ray_rows", lambda shards, model, seq_len, seed, start, shuffle_block=0, **pipeline:
                        local_rows(shards, ByteTokenizer(), seq_len, seed, start))
    expected = list(itertools.islice(global_batches(local_rows(shards, ByteTokenizer(), 63, 0, Cursor()), 4,
                                                    Cursor()), 12))
    feeder = data_feed.DataFeeder(shards, Model(), 63, 0, 4, replay=3)

    def step(k: int, reset: bool = False) -> None:
        for rank in (0, 1):
            _, ids, end, _ = feeder.get(expected[k].start.as_list(), rank, 2, reset=reset and rank == 0)
            np.testing.assert_array_equal(ids, expected[k].rows_for(rank, 2)[1])
            assert Cursor(*end) == expected[k].end

    for k in range(7):
        step(k, reset=k == 0)
    assert feeder.restarts == 1
    for k in range(4, 9):  # the group restarts from step 4's checkpoint: batches 4, 5, 6 again
        step(k, reset=k == 4)
    assert feeder.restarts == 1
    step(2, reset=True)  # further back than the window holds
    assert feeder.restarts == 2
    step(3)
