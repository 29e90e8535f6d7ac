"""Capacity arriving and nodes leaving on a simulated multi-node cluster (``ray.cluster_utils.Cluster``).

Worker nodes have one training slot each. The run takes a memory snapshot every step and a disk
checkpoint every 10. It starts with capacity for 2 workers; 2 more nodes join and the run grows
to 4 at its next checkpoint, redoing no step; then a node is removed and the group restarts on
the 3 survivors (dp 3) from the newest memory snapshot, losing at most one step: the lost node's
part of it is read from its replica on another node. The snapshot is resharded onto dp 3 and
local batch x accumulation re-derived for the same global batch. Every step's loss equals an
uninterrupted 4-worker run's, all starting from the same seed weights.
"""

import os
import threading
import time

import pytest

import raytitan
from raytitan.trainer.elastic.history import read_progress, read_starts

from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow

STEPS = 22


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def fit(root, data_dir, **extra):
    settings = dict(
        job__dump_folder=str(root), ray__num_workers=4, ray__resources_per_worker="CPU=0.5,slot=1",
        ray__max_failures=3, training__steps=STEPS, training__seq_len=64, training__global_batch_size=12,
        training__local_batch_size=3, training__dataset="files", training__dataset_path=data_dir,
        training__deterministic=True, checkpoint__interval=2, metrics__log_freq=1,
        metrics__enable_tensorboard=False, lr_scheduler__warmup_steps=2,
    )
    raytitan.fit(None, **{**settings, **extra})
    final = {}
    for line in raytitan.read_metrics(os.path.join(str(root), "llama3-debugmodel")):
        if "loss" in line:
            final[line["step"]] = line["loss"]
    return final


def test_capacity_arrives_then_a_node_is_lost(tmp_path, data_dir):
    from ray.cluster_utils import Cluster

    # Seed weights from one process, and the uninterrupted run on 4 plain gloo ranks (no Ray).
    seed_root = str(tmp_path / "seed")
    run_ranks(tiny_config(seed_root, data_dir, checkpoint={"create_seed_checkpoint": True}), 1, str(tmp_path))
    seed = {"checkpoint__initial_load_path": os.path.join(seed_root, "run", "checkpoint", "step-0"),
            "checkpoint__initial_load_model_only": True}
    fixed = tiny_config(str(tmp_path / "fixed"), data_dir, training={
        "steps": STEPS, "global_batch_size": 12, "local_batch_size": 3},
        checkpoint={"enable": False, "initial_load_path": seed["checkpoint__initial_load_path"],
                    "initial_load_model_only": True})
    expected = dict(enumerate(run_ranks(fixed, 4, str(tmp_path))["losses"], start=1))

    # Detect a dead node in ~10 s rather than Ray's production default of about a minute. Not
    # faster: on 2 busy cores a live node's raylet can miss a few seconds of heartbeats while
    # workers start, and would be declared dead too.
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 10}
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "_system_config": fast_health_checks})
    try:
        nodes = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
        cluster.wait_for_nodes()

        run_dir = os.path.join(str(tmp_path / "elastic"), "llama3-debugmodel")
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(losses=fit(
            tmp_path / "elastic", data_dir, ray__min_workers=2, ray__max_workers=4, ray__resize_check_interval_s=1,
            checkpoint__interval=10, checkpoint__memory_interval=1, **seed)))
        thread.start()
        wait_for(lambda: (read_progress(run_dir) or {}).get("step", 0) >= 3, 240, "step 3 on 2 workers")
        nodes += [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
        grown = wait_for(lambda: [s for s in read_starts(run_dir) if s["world"] == 4], 240, "growth to 4 workers")[0]
        wait_for(lambda: (read_progress(run_dir) or {}).get("step", 0) > grown["resumed_step"] + 1,
                 240, "progress on 4 workers")
        cluster.remove_node(nodes[3], allow_graceful=False)
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()

    starts = read_starts(run_dir)
    worlds = [s["world"] for s in starts]
    assert worlds[0] == 2 and worlds[-1] == 3, starts
    # Growing waits for a checkpoint boundary: it resumes from the step it stopped at, losing none.
    assert grown["cause"].startswith("grew after the checkpoint of step"), grown
    assert grown["lost_steps"] == 0 and grown["resumed_step"] % 10 == 0, grown
    print(f"grow: {grown['seconds_since_grow_stop']:.1f}s from the stop at step {grown['resumed_step']} to the "
          f"start on 4 workers; timings {grown['timings']}")
    shrunk = starts[-1]
    # From memory: a complete snapshot needs every rank's part, the lost node's rank's too (its replica).
    assert shrunk["resumed_from"] == "memory" and shrunk["lost_steps"] <= 1, shrunk
    assert shrunk["resumed_step"] % 10, shrunk  # not a disk checkpoint's step
    assert (shrunk["dp"], shrunk["local_batch"] * shrunk["accumulation"]) == (3, 4)  # 12 = 3 x 4
    assert sorted(outcome["losses"]) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert abs(outcome["losses"][step] - loss) / loss < 1e-4, (step, outcome["losses"][step], loss)
