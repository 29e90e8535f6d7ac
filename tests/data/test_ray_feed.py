"""The Ray Data pipeline yields exactly the in-process stream, and the feeder resumes anywhere."""

import itertools
import time

import numpy as np
import pytest
import ray

from raytitan.config.job import Model
from raytitan.ray.data_feed import DataFeeder, ray_rows
from raytitan.components.data.stream import Cursor, global_batches, local_rows
from raytitan.components.data.synthetic import ensure_synthetic_shards
from raytitan.components.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_shards(str(tmp_path_factory.mktemp("feed")), seed=0, num_shards=3, docs_per_shard=12)


def reference(shards, start, n):
    return list(itertools.islice(global_batches(local_rows(shards, ByteTokenizer(), 63, 0, start), 8, start), n))


def test_ray_data_order_equals_local_order(ray_local, shards):
    start = Cursor(0, 1, 5)
    expected = reference(shards, start, 40)  # crosses into the next epoch
    got = list(itertools.islice(global_batches(ray_rows(shards, Model(), 63, 0, start, shards_per_read=2), 8, start), 40))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_a_halted_pipeline_frees_its_packers_for_the_next(ray_local, shards):
    """A feeder that restarts its pipeline elsewhere halts the old one, whose packers wait at its
    gate for a consumer that is gone: the new pipeline's pool must get their CPUs. Each pool here
    takes the test instance's 2 CPUs, so without the halt the new one never starts."""
    import threading

    from raytitan.ray.data_feed import Halt

    halt = Halt()
    old = ray_rows(shards, Model(), 63, 0, Cursor(), read_ahead_rows=1, packers=2, cpus_per_packer=1.0, halt=halt)
    next(old)  # its pool runs; its packers soon wait at the gate for this consumer
    halt.set()
    got = []
    new = threading.Thread(target=lambda: got.append(next(ray_rows(shards, Model(), 63, 0, Cursor(0, 1, 0),
                                                                   packers=2, cpus_per_packer=1.0))), daemon=True)
    new.start()
    new.join(timeout=120)
    assert got, "the new pipeline found no CPUs for its packers: the halted one still holds them"
    expected = next(local_rows(shards, ByteTokenizer(), 63, 0, Cursor(0, 1, 0)))
    np.testing.assert_array_equal(got[0]["tokens"][0], expected["tokens"][0])
    assert list(old) == []  # read again, the halted stream ends, without an error


def test_feeder_serves_ranks_and_resumes_on_another_dp(ray_local, shards):
    """Warm-started, the feeder computes the first batches before any rank asks, and serves the
    ranks from them (no second pipeline from the same start)."""
    feeder = ray.remote(DataFeeder).options(max_concurrency=8).remote(shards, Model(), 63, 0, 8)
    ray.get(feeder.warm_start.remote())
    deadline = time.monotonic() + 120
    while ray.get(feeder.stats.remote())["buffered_batches"] < 4:  # the prefetch window fills with no request
        assert time.monotonic() < deadline, "a warm-started feeder produced nothing before any rank asked"
        time.sleep(0.05)
    expected = reference(shards, Cursor(), 12)
    cursor = Cursor()
    for k in range(6):  # two ranks, one request each in flight
        parts = ray.get([feeder.get.remote(cursor.as_list(), r, 2, k == 0) for r in range(2)])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), expected[k].ids)
        cursor = Cursor(*parts[0][2])
    assert ray.get(feeder.stats.remote())["rows_produced"] <= (6 + 4) * 8  # one stream: 6 served, 4 ahead
    # A new group of 4 ranks restarts from an earlier checkpointed cursor.
    cursor = expected[2].end
    for k in range(3, 8):
        parts = ray.get([feeder.get.remote(cursor.as_list(), r, 4, k == 3) for r in range(4)])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), expected[k].ids)
        cursor = Cursor(*parts[0][2])
    assert ray.get(feeder.stats.remote())["buffered_batches"] <= 4  # bounded prefetch
    ray.kill(feeder)


def test_feeder_memory_stays_bounded_while_streaming(ray_local, tmp_path):
    """Stream far more than the prefetch window through a rank's loader: the feeder never holds or
    produces more than it may, its packers read shards only about a window ahead (not a fixed run of
    64 shard-epochs), and the rank's metrics report the pipeline's rate, buffer and latency."""
    from raytitan.ray.feed_loader import RayFeedLoader

    corpus = ensure_synthetic_shards(str(tmp_path), seed=1, num_shards=4, docs_per_shard=60)
    prefetch, global_batch = 3, 8
    feeder = ray.remote(DataFeeder).options(max_concurrency=4).remote(corpus, Model(), 63, 0, global_batch, 0, prefetch)
    loader, high_water, most_ahead = RayFeedLoader(feeder, global_batch, 0, 1), 0, 0
    for k in range(60):  # 60 x 8 windows: several times the 3-batch window, across shards
        loader.next_batch()
        stats = ray.get(feeder.stats.remote())
        high_water = max(high_water, stats["buffered_batches"])
        assert stats["rows_produced"] <= (k + 1 + prefetch + 2) * global_batch
        consumed = loader.cursor.epoch * len(corpus) + loader.cursor.shard_pos + 1  # shard items reached
        most_ahead = max(most_ahead, stats["shard_items_read"] - consumed)
    assert high_water <= prefetch
    packers = stats["packers"]
    assert packers == 2 and 0 <= most_ahead <= 6 * packers + 4, most_ahead  # the gate's bound; 64 before
    metrics = loader.metrics()
    assert metrics["data/tokens_per_s"] > 0 and 0 <= metrics["data/buffered_batches"] <= prefetch
    assert metrics["data/packers"] == 2 and metrics["data/packer_tokens_per_s"] > 0
    assert 0 < metrics["data/request_latency_mean_s"] <= metrics["data/request_latency_max_s"] < 60
    print(f"shard items read ahead of the consumer: at most {most_ahead}; metrics {metrics}")
    ray.kill(feeder)


def test_a_dataset_without_a_window_reaches_the_ranks_as_a_data_source_error(ray_local, tmp_path):
    """Every record bad: the pipeline's error reaches the ranks as the DataSourceError it is (it used to
    loop forever, the ranks warning that the pipeline may be starved), asked directly or through a relay."""
    from raytitan.components.data.sources import DataSourceError
    from raytitan.ray.data_feed import Relays
    from raytitan.ray.feed_loader import RayFeedLoader

    bad = [str(tmp_path / f"s{i}.jsonl") for i in range(2)]
    for path in bad:
        with open(path, "w") as f:
            f.write("not json\n" * 3)
    feeder = ray.remote(DataFeeder).options(max_concurrency=4, name="test-bad-data").remote(bad, Model(), 63, 0, 8)
    with pytest.raises(DataSourceError) as error:
        ray.get(feeder.get.remote([0, 0, 0], 0, 1, True), timeout=120)  # a GetTimeoutError if it hangs again
    message = str(error.value.cause if hasattr(error.value, "cause") else error.value)
    assert message.startswith("no window of seq_len + 1 = 64 tokens in a whole epoch") and bad[0] in message
    assert "6 records, 6 skipped" in message and "retry" not in message  # Ray Data's retry advice is dropped
    with pytest.raises(DataSourceError, match="no window"):  # the rank's own loader
        RayFeedLoader(feeder, 8, 0, 1).next_batch()
    # Through this node's relay, found as a rank finds it (the launcher starts one on every node).
    relays = Relays("test-bad-data", {"train": "test-bad-data"})
    relays.ensure({ray.get_runtime_context().get_node_id()})
    loader = RayFeedLoader(feeder, 8, 0, 1, relays="test-bad-data")
    with pytest.raises(DataSourceError, match="no window") as error:
        loader.next_batch()
    assert "retry" not in str(error.value)
    assert ray.get(relays.actors[ray.get_runtime_context().get_node_id()].stats.remote())["requests"] == 1
    relays.close()
    ray.kill(feeder)


def test_simulated_readers_each_get_exactly_their_rows(ray_local, shards):
    """benchmarks/data_scale.py's simulated ranks: 4 ranks asking the feeder, then 8 ranks from where they
    stopped (a dp change) through two relays (as on two nodes), then 8 more steps through them after
    Ray restarted the killed feeder. Each step's rows over the ranks in rank order are exactly the
    stream's global batch, every rank got exactly its share, and through relays the feeder answered
    per relay, not per rank."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import data_scale

    steps, global_batch = 4, 8
    expected = list(itertools.islice(global_batches(local_rows(shards, ByteTokenizer(), 63, 0, Cursor()),
                                                    global_batch, Cursor()), 3 * steps))
    feeder = data_scale.start_feeder(shards, 63, global_batch, name="test-simulated-readers")
    relays = [ray.remote(data_scale.MeasuredRelay).options(num_cpus=0).remote({"train": "test-simulated-readers"})
              for _ in range(2)]
    try:  # the ranks run in this process: no reader actor to start on the 2 shared cores
        first = data_scale.measure(feeder, [], readers=4, steps=steps, step_rate=20, lead_s=0.2)
        second = data_scale.measure(feeder, [], readers=8, steps=steps, step_rate=20, start=first["end"],
                                    lead_s=0.5, relays=relays)
        ray.kill(feeder, no_restart=False)  # Ray starts it again; the relays' next fetches go to the new one
        third = data_scale.measure(feeder, [], readers=8, steps=steps, step_rate=20, start=second["end"],
                                   lead_s=0.2, relays=relays)
    finally:
        for actor in [*relays, feeder]:
            ray.kill(actor)
    assert first["end"] == expected[steps - 1].end and second["end"] == expected[2 * steps - 1].end
    assert third["end"] == expected[-1].end
    runs = ((first, expected[:steps], 4), (second, expected[steps:2 * steps], 8), (third, expected[2 * steps:], 8))
    for result, batches, readers in runs:
        assert sorted(result["ranks"]) == list(range(readers))
        for k, batch in enumerate(batches):
            parts = [result["ranks"][r]["ids"][k] for r in range(readers)]
            assert all(len(p) == global_batch // readers for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), batch.ids)
        assert data_scale.check_rows(result, batches, global_batch // readers) == steps * global_batch
    assert first["feeder_calls"] >= 4 * steps  # asked directly: one call per rank and step
    # Through 2 relays: at most a fetch and a position report per relay and step (8 x 4 = 32 direct).
    assert second["feeder_calls"] <= 2 * 2 * steps + 2, second["feeder_calls"]
