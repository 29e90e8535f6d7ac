"""Pool sizing, the read-ahead gate and the data metrics, without Ray (quick)."""

import ast
import asyncio
import pathlib

import pytest


from raytitan.components.data.loader import LocalLoader
from raytitan.components.data.synthetic import ensure_synthetic_shards
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.components.metrics import data_summary
from raytitan.ray import data_feed
from raytitan.ray.data_feed import _Gate, pool_size


def test_the_reserved_share_is_what_the_launcher_leaves_for_data():
    tree = ast.parse((pathlib.Path(data_feed.__file__).parent / "launcher.py").read_text())
    value = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "DATA_CPUS" for t in node.targets))
    assert value == data_feed.RESERVED_CPUS


def test_pool_size_follows_demand_within_the_free_cpus():
    assert pool_size(0, 64.0) == 2  # no demand known: the reserved share (2 x 0.5 CPU), whatever is free
    assert pool_size(0, 0.0) == 2  # the launcher reserves it
    assert pool_size(2, 64.0, demand_tokens_per_s=3e6, packer_tokens_per_s=1e6) == 4  # 1.25 x 3
    assert pool_size(2, 1.5, demand_tokens_per_s=3e6, packer_tokens_per_s=1e6) == 3  # only what is free
    assert pool_size(8, 64.0, demand_tokens_per_s=1e5, packer_tokens_per_s=1e6) == 2  # shrinks to the share
    assert pool_size(3, 64.0, starving=True) == 6  # starving with no rate known: double
    assert pool_size(2, 1e6, demand_tokens_per_s=1e12, packer_tokens_per_s=1.0) == data_feed.MAX_PACKERS


def test_the_gate_admits_items_no_further_than_the_rows_ahead_allow():
    async def run():
        gate = _Gate(read_ahead_rows=10, packers=1, first_item=5)
        assert gate.ahead() == 2  # two items per packer before any item's size is known
        assert await gate.admit(5) and await gate.admit(6)
        waiting = asyncio.ensure_future(gate.admit(8))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await gate.done(5, rows=10, tokens=630, busy_s=0.1)  # 10 rows an item: one more item covers 10 rows
        await gate.consumed(6)  # item 5 consumed, 6 streaming
        assert await asyncio.wait_for(waiting, 1)
        await gate.done(7, rows=0, tokens=0, busy_s=0.01)  # no rows: it never reaches the consumer
        await gate.done(6, rows=10, tokens=630, busy_s=0.1)
        await gate.consumed(8)
        assert gate.progress == 7 and gate.packer_tokens_per_s() == pytest.approx(1260 / 0.21)
        assert await gate.end_run() == 8
        assert not await gate.admit(9)  # after the cut: the next run reads it

    asyncio.run(run())


def test_the_local_loader_reports_its_rate_and_latency(tmp_path):
    shards = ensure_synthetic_shards(str(tmp_path), seed=0, num_shards=2, docs_per_shard=8)
    loader = LocalLoader(shards, ByteTokenizer(), 63, 0, 8, 0, 1)
    for _ in range(3):
        loader.next_batch()
    metrics = loader.metrics()
    assert metrics["data/tokens_per_s"] > 0 and "data/buffered_batches" not in metrics
    assert 0 < metrics["data/request_latency_mean_s"] <= metrics["data/request_latency_max_s"]
    assert "data/request_latency_mean_s" not in loader.metrics()  # since the last log only


def test_the_log_line_names_the_data_metrics():
    line = data_summary({"data/tokens_per_s": 1234567.0, "data/buffered_batches": 3.0, "data/packers": 2.0,
                         "data/request_latency_mean_s": 0.002, "data/request_latency_max_s": 0.01})
    assert line == "1,234,567 tok/s produced, 3 batches ahead, 2 packers, request 2.0 ms mean, 10.0 ms max"
    assert data_summary({"data/bad_records": 0}) == ""
