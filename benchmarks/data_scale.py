"""Many data-parallel readers against one DataFeeder, and through per-node relays: who keeps up?

Simulated reader ranks (no model) ask for their rows of every global batch with the remote call a
training rank's ``RayFeedLoader`` makes (``raytitan.ray.data_feed.ask``): ``reset`` on a rank's
first request, then one request in flight for the next batch, sent as soon as a batch arrives.
Served by ONE ``DataFeeder`` (the production class, started with the production options), or,
with ``--relays per-node`` (or ``both``: each reader count measured both ways, one table), by a
``DataRelay`` on every node (started by the launcher's ``Relays``) that fetches each global batch
once from the feeder and answers its node's ranks. Every rank
takes one batch per step at a fixed step rate, all ranks at the same moments (training ranks step
in lockstep). Ranks are asyncio tasks inside a few reader actors, so 1,024 of them fit a small
machine.

Per number of readers N (the data-parallel degree; global batch = N x local batch) it reports:
request latency (sent to reply, in the reader), the time a rank waited for its batch at a step,
the feeder process's CPU time over wall time while serving and, before, while idle with its
prefetch window full (its serving threads and the Ray Data executor it drives; the packing actors
are separate processes), the relays' CPU (summed), the calls the feeder answered per second,
tokens/s delivered to the ranks (seq_len
tokens a row), whether the step rate was sustained, and whether every rank got exactly its rows
of every global batch (compared with the stream computed in this process).

    python benchmarks/data_scale.py [--readers 8,64,256,1024] [--step-rate 1] [--steps 20]
        [--local-batch 1] [--seq-len 256] [--reader-actors 4] [--cluster-nodes K]
        [--relays none|per-node|both] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from raytitan.components.data.stream import Cursor, global_batches, local_rows
from raytitan.ray.data_feed import DataFeeder, DataRelay, Relays, ask, node_relay

if __name__ != "__main__":
    # Imported (by the tests): Ray workers cannot import this file by name, so its actors travel by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

IDLE_S = 3.0  # seconds the feeder's idle CPU is measured over, before the readers start
# As raytitan.ray.launcher.start_feeder gives them: Ray starts a killed feeder again and resends its calls.
FEEDER_OPTIONS = {"num_cpus": 0, "max_concurrency": 64, "max_restarts": -1, "max_task_retries": -1}


class MeasuredFeeder(DataFeeder):
    """The production feeder, plus a reading of its own process's CPU time."""

    def usage(self) -> tuple[float, float]:
        return time.process_time(), time.monotonic()


class MeasuredRelay(DataRelay):
    """The production relay, plus a reading of its own process's CPU time."""

    def usage(self) -> tuple[float, float]:
        return time.process_time(), time.monotonic()


def row_checksums(tokens: np.ndarray) -> np.ndarray:
    """One position-weighted sum per row: rows with the right ids but other tokens would differ."""
    return (tokens.astype(np.int64) * np.arange(1, tokens.shape[1] + 1, dtype=np.int64)).sum(axis=1)


class ReaderGroup:
    """Simulated training ranks in one process, each an asyncio task asking the feeder as a rank does."""

    def ready(self) -> bool:
        return True

    async def _ask(self, feeder, relay, cursor: Cursor, rank: int, dp_size: int, reset: bool):
        sent = time.time()
        tokens, ids, end, _bad = await ask(feeder, relay, "train", cursor, rank, dp_size, reset)
        return tokens, ids, end, sent, time.time()

    async def _rank(self, feeder, relay, rank: int, dp_size: int, start: Cursor, steps: int, period: float,
                    t0: float):
        cursor, pending = start, None
        out = {"latency": [], "wait": [], "due": [], "got": [], "ids": [], "sums": []}
        for step in range(steps):
            due = t0 + step * period
            if (delay := due - time.time()) > 0:
                await asyncio.sleep(delay)
            asked = time.time()
            if pending is None or pending[0] != cursor:  # nothing in flight for this cursor: a (re)start
                pending = (cursor, asyncio.ensure_future(self._ask(feeder, relay, cursor, rank, dp_size, True)))
            tokens, ids, end, sent, replied = await pending[1]
            got = time.time()
            cursor = Cursor(*end)
            if step + 1 < steps:  # the next batch's request goes out now, as RayFeedLoader sends it
                pending = (cursor, asyncio.ensure_future(self._ask(feeder, relay, cursor, rank, dp_size, False)))
            out["latency"].append(replied - sent)
            out["wait"].append(got - asked)
            out["due"].append(due)
            out["got"].append(got)
            out["ids"].append(ids)
            out["sums"].append(row_checksums(tokens))
        out["end"] = cursor.as_list()
        return out

    async def run(self, feeder, ranks: list[int], dp_size: int, start: list[int], steps: int, step_rate: float,
                  t0: float, relay=None) -> dict:
        """``relay``: None (ask the feeder), a relay, or a launch id (this process's node's relay, as a rank finds it)."""
        cpu0 = time.process_time()
        relay = node_relay(relay) if isinstance(relay, str) else relay
        outs = await asyncio.gather(*(self._rank(feeder, relay, r, dp_size, Cursor(*start), steps, 1.0 / step_rate,
                                                 t0) for r in ranks))
        result = {r: {k: np.asarray(v) for k, v in o.items()} for r, o in zip(ranks, outs)}
        return {"ranks": result, "cpu_s": time.process_time() - cpu0}


def start_feeder(shards: list[str], seq_len: int, global_batch: int, node_id: str | None = None,
                 name: str | None = None):
    """A MeasuredFeeder with the production options, pinned to ``node_id`` (the driver's node by default),
    named ``name`` (relays find their feeder by name)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytitan.config.job import Model

    node_id = node_id or ray.get_runtime_context().get_node_id()
    return ray.remote(MeasuredFeeder).options(
        **FEEDER_OPTIONS, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        **({"name": name} if name else {}),
    ).remote(shards, Model(), seq_len, 0, global_batch)


def reader_groups(count: int, spread: bool = False) -> list:
    """``count`` reader actors, ready; they reserve no CPU (each simulates ranks that would)."""
    import ray

    options = {"num_cpus": 0, "max_concurrency": 4}
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    groups = [ray.remote(ReaderGroup).options(**options).remote() for _ in range(count)]
    ray.get([g.ready.remote() for g in groups])
    return groups


def measure(feeder, groups: list, readers: int, steps: int, step_rate: float, start: Cursor | None = None,
            lead_s: float = 1.0, relays=None, relay_actors: list | None = None) -> dict:
    """Run ``readers`` simulated ranks (split across the reader actors ``groups``, or in this process when
    there are none) for ``steps`` steps from ``start``.

    ``relays``: None (every rank asks the feeder); a launch id (each reader actor's ranks ask their
    node's relay); or a list of relays (the ranks, run in this process, split over them in order).
    ``relay_actors``: the relays whose CPU is read (by default a list given as ``relays``).
    Returns every rank's ids and row checksums per step, the latencies and arrival times, the
    feeder's, the relays' and the readers' CPU seconds, the wall time, the calls the feeder answered,
    and the cursor after the last step."""
    import ray

    start = start or Cursor()
    servers = relay_actors if relay_actors is not None else relays if isinstance(relays, list) else []
    cpu0, mono0 = ray.get(feeder.usage.remote())
    relay_cpu0 = [c for c, _ in ray.get([r.usage.remote() for r in servers])] if servers else []
    calls0 = ray.get(feeder.stats.remote())["requests"]
    t0 = time.time() + lead_s  # every group has the call before the first step is due
    if groups:
        chunks = [list(c) for c in np.array_split(np.arange(readers), min(len(groups), readers))]
        launch = relays if isinstance(relays, str) else None
        outs = ray.get([g.run.remote(feeder, [int(r) for r in chunk], readers, start.as_list(), steps, step_rate,
                                     t0, launch) for g, chunk in zip(groups, chunks)])
    else:  # no reader actors: the ranks run in this process (a test's few ranks, without a process to start)
        routes = [(list(c), r) for c, r in zip(np.array_split(np.arange(readers), len(relays)), relays)] \
            if isinstance(relays, list) else [(list(range(readers)), None)]

        async def all_ranks():
            return await asyncio.gather(*(ReaderGroup().run(feeder, [int(r) for r in chunk], readers, start.as_list(),
                                                            steps, step_rate, t0, relay) for chunk, relay in routes))

        outs = asyncio.run(all_ranks())
    cpu1, mono1 = ray.get(feeder.usage.remote())
    relay_cpu1 = [c for c, _ in ray.get([r.usage.remote() for r in servers])] if servers else []
    calls1 = ray.get(feeder.stats.remote())["requests"]
    ranks = {r: o for out in outs for r, o in out["ranks"].items()}
    return {"ranks": ranks, "t0": t0, "feeder_cpu_s": cpu1 - cpu0, "feeder_wall_s": mono1 - mono0,
            "relays_cpu_s": sum(relay_cpu1) - sum(relay_cpu0), "feeder_calls": calls1 - calls0,
            "reader_cpu_s": sum(out["cpu_s"] for out in outs), "end": Cursor(*ranks[readers - 1]["end"])}


def check_rows(result: dict, expected: list, local_batch: int) -> int:
    """Every rank got exactly ``local_batch`` rows per step, and the ranks' rows in rank order are each
    expected global batch, ids and tokens (no duplicate, gap or reordering). Returns the rows checked."""
    ranks = result["ranks"]
    checked = 0
    for step, batch in enumerate(expected):
        for r in range(len(ranks)):
            if ranks[r]["ids"][step].shape != (local_batch, 3):
                raise AssertionError(f"rank {r} got {ranks[r]['ids'][step].shape[0]} rows at step {step}, "
                                     f"not {local_batch}")
        ids = np.concatenate([ranks[r]["ids"][step] for r in range(len(ranks))])
        sums = np.concatenate([ranks[r]["sums"][step] for r in range(len(ranks))])
        if not np.array_equal(ids, batch.ids):
            raise AssertionError(f"step {step}: the ranks' rows are not the global batch at {batch.start}")
        if not np.array_equal(sums, row_checksums(batch.tokens)):
            raise AssertionError(f"step {step}: a rank's tokens differ from the stream's")
        checked += len(ids)
    return checked


def summarize(result: dict, readers: int, local_batch: int, seq_len: int, steps: int, step_rate: float) -> dict:
    """The table row: latencies exclude step 0 (the ranks' first, resetting request)."""
    ranks = result["ranks"].values()
    latency = np.concatenate([r["latency"][1:] for r in ranks]) * 1e3
    wait = np.concatenate([r["wait"][1:] for r in ranks]) * 1e3
    late = np.concatenate([r["got"] - r["due"] for r in ranks])
    first = max(r["got"][0] for r in ranks)
    last = max(r["got"][-1] for r in ranks)
    achieved = (steps - 1) / (last - first) if steps > 1 and last > first else float("nan")
    period = 1.0 / step_rate
    wall = last - result["t0"]
    return {
        "readers": readers, "global_batch": readers * local_batch, "step_rate": step_rate,
        "achieved_steps_per_s": achieved,
        "sustained": bool(achieved >= 0.95 * step_rate and np.percentile(late, 99) < period),
        "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p99_ms": float(np.percentile(latency, 99)),
        "wait_p50_ms": float(np.percentile(wait, 50)), "wait_p99_ms": float(np.percentile(wait, 99)),
        "late_max_ms": float(late.max() * 1e3),
        "feeder_cpu": result["feeder_cpu_s"] / result["feeder_wall_s"],
        "relays_cpu": result["relays_cpu_s"] / result["feeder_wall_s"],
        "feeder_calls_per_s": result["feeder_calls"] / result["feeder_wall_s"],
        "readers_cpu": result["reader_cpu_s"] / wall,
        "tokens_per_s": readers * local_batch * seq_len * steps / wall,
        "requests_per_s": readers * steps / wall,
    }


def start_relays(feeder_name: str, launch: str) -> Relays:
    """A MeasuredRelay on every alive node, as the launcher starts them, each ready."""
    import ray

    relays = Relays(launch, {"train": feeder_name}, relay_class=MeasuredRelay)
    relays.ensure({n["NodeID"] for n in ray.nodes() if n.get("Alive")})
    ray.get([r.usage.remote() for r in relays.actors.values()])
    return relays


def run_one(shards, groups, readers: int, args, node_id=None, relays: bool = False) -> dict:
    """One feeder for global batch N x local batch (with a relay per node if ``relays``), warmed up,
    measured, verified, then stopped."""
    import ray

    from raytitan.components.data.tokenizer import ByteTokenizer

    global_batch = readers * args.local_batch
    name = f"data-scale-feeder-{readers}-{'relays' if relays else 'direct'}"
    feeder = start_feeder(shards, args.seq_len, global_batch, node_id, name=name)
    serving, label = None, "one feeder"
    try:
        if relays:
            serving = start_relays(name, f"bench{readers}")
            label = f"relays x {len(serving.actors)}"
        ray.get(feeder.warm_start.remote())
        deadline = time.monotonic() + 300
        while ray.get(feeder.stats.remote())["buffered_batches"] < 4:  # the prefetch window, full
            if time.monotonic() > deadline:
                raise RuntimeError(f"the feeder produced no full prefetch window for {readers} readers in 300 s")
            time.sleep(0.1)
        # What the feeder costs with nobody asking (its window full), to tell serving from the rest.
        cpu0, mono0 = ray.get(feeder.usage.remote())
        time.sleep(IDLE_S)
        cpu1, mono1 = ray.get(feeder.usage.remote())
        result = measure(feeder, groups, readers, args.steps, args.step_rate, relays=serving and serving.launch,
                         relay_actors=serving and list(serving.actors.values()))
    finally:
        if serving:
            serving.close()
        ray.kill(feeder)
    expected = list(itertools.islice(
        global_batches(local_rows(shards, ByteTokenizer(), args.seq_len, 0, Cursor()), global_batch, Cursor()),
        args.steps))
    row = summarize(result, readers, args.local_batch, args.seq_len, args.steps, args.step_rate)
    row["feeder_idle_cpu"] = (cpu1 - cpu0) / (mono1 - mono0)
    row["rows_verified"] = check_rows(result, expected, args.local_batch)
    row["rows_per_reader_step"] = args.local_batch
    row["serving"] = label
    row["load_1min"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", default="8,64,256,1024", help="comma-separated reader counts (dp degrees)")
    parser.add_argument("--step-rate", type=float, default=1.0, help="steps per second every rank asks at")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--local-batch", type=int, default=1, help="rows per rank per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reader-actors", type=int, default=4, help="processes the simulated ranks are spread over")
    parser.add_argument("--cluster-nodes", type=int, default=0,
                        help="run on a ray.cluster_utils.Cluster of K nodes on this machine (0: one local instance)")
    parser.add_argument("--cpus-per-node", type=float, default=1, help="CPUs each simulated node offers")
    parser.add_argument("--relays", choices=["none", "per-node", "both"], default="none",
                        help="serve the ranks through a relay per node; both: every reader count both ways")
    parser.add_argument("--quick", action="store_true", help="4 and 8 readers, 5 steps, a small corpus")
    args = parser.parse_args()
    if args.quick:
        args.readers, args.steps, args.step_rate = "4,8", 5, 5.0
    counts = [int(n) for n in args.readers.split(",")]
    load_at_start = os.getloadavg()[0]  # the machine is shared: its load is part of the result

    import ray
    from common import print_table, record

    from raytitan.components.data.synthetic import ensure_synthetic_shards

    work = tempfile.mkdtemp(prefix="raytitan-data-scale-")
    shards = ensure_synthetic_shards(os.path.join(work, "c4"), seed=0, num_shards=3 if args.quick else 8,
                                     docs_per_shard=200 if args.quick else 2000)
    cluster = None
    rows = []
    try:
        if args.cluster_nodes:
            from ray.cluster_utils import Cluster

            node = {"num_cpus": args.cpus_per_node, "object_store_memory": 256 * 1024 ** 2}
            cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
            for _ in range(args.cluster_nodes - 1):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
        else:
            from raytitan.ray.launcher import start_local_ray

            start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        groups = reader_groups(args.reader_actors, spread=bool(args.cluster_nodes))
        forms = {"none": [False], "per-node": [True], "both": [False, True]}[args.relays]
        for readers in counts:
            for relays in forms:
                rows.append(run_one(shards, groups, readers, args, relays=relays))
                print_table(rows[-1:], list(rows[-1]))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, ["readers", "serving", "global_batch", "latency_p50_ms", "latency_p99_ms", "wait_p99_ms",
                       "feeder_cpu", "feeder_idle_cpu", "relays_cpu", "readers_cpu", "feeder_calls_per_s",
                       "tokens_per_s", "requests_per_s", "achieved_steps_per_s", "sustained", "rows_verified",
                       "load_1min"])
    record("data_scale", dict(vars(args), cpus=os.cpu_count(), load_1min_at_start=load_at_start), rows)


if __name__ == "__main__":
    main()
