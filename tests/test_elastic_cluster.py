"""Node loss and return on a simulated multi-node cluster (``ray.cluster_utils.Cluster``).

Four worker nodes with one training slot each. Mid-run one node is removed: the group
restarts on the 3 survivors (dp 3), resharding the checkpoint and re-deriving local batch x
accumulation for the same global batch. The node then returns and the run grows back to 4 at the next checkpoint, redoing no step.
Every step's loss equals the uninterrupted 4-worker run's.
"""

import os
import threading
import time

import pytest

import raytitan
from raytitan.restarts import read_progress, read_starts

from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow

STEPS = 40


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def fit(root, data_dir, **extra):
    raytitan.fit(
        None, job__dump_folder=str(root), ray__num_workers=4, ray__resources_per_worker="CPU=0.5,slot=1",
        ray__max_failures=3, training__steps=STEPS, training__seq_len=64, training__global_batch_size=12,
        training__local_batch_size=3, training__dataset="files", training__dataset_path=data_dir,
        training__deterministic=True, checkpoint__interval=2, metrics__log_freq=1,
        metrics__enable_tensorboard=False, lr_scheduler__warmup_steps=2, **extra,
    )
    final = {}
    for line in raytitan.read_metrics(os.path.join(str(root), "llama3-debugmodel")):
        if "loss" in line:
            final[line["step"]] = line["loss"]
    return final


def test_node_lost_then_returned(tmp_path, data_dir, monkeypatch):
    from ray.cluster_utils import Cluster

    # The uninterrupted run, on 4 plain gloo ranks (no Ray): the same layout, so the same init.
    fixed = tiny_config(str(tmp_path / "fixed"), data_dir, training={
        "steps": STEPS, "global_batch_size": 12, "local_batch_size": 3}, checkpoint={"enable": False})
    expected = dict(enumerate(run_ranks(fixed, 4, str(tmp_path))["losses"], start=1))

    # After a node loss Ray first retries the old size until this start timeout (default 60 s).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    # Detect a dead node in ~10 s rather than Ray's production default of about a minute. Not
    # faster: on 2 busy cores a live node's raylet can miss a few seconds of heartbeats while
    # workers start, and would be declared dead too.
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 10}
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "_system_config": fast_health_checks})
    try:
        nodes = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(4)]
        cluster.wait_for_nodes()

        run_dir = os.path.join(str(tmp_path / "elastic"), "llama3-debugmodel")
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(losses=fit(
            tmp_path / "elastic", data_dir, ray__min_workers=2, ray__max_workers=4, ray__resize_check_interval_s=1)))
        thread.start()
        wait_for(lambda: (read_progress(run_dir) or {}).get("step", 0) >= 5, 240, "step 5 on 4 workers")
        cluster.remove_node(nodes[3], allow_graceful=False)
        wait_for(lambda: any(s["world"] == 3 for s in read_starts(run_dir)), 240, "restart on 3 workers")
        shrunk_at = len(read_starts(run_dir))
        wait_for(lambda: (read_progress(run_dir) or {}).get("step", 0) > read_starts(run_dir)[-1]["resumed_step"] + 1,
                 240, "progress on 3 workers")
        cluster.add_node(num_cpus=1, resources={"slot": 1})
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()

    starts = read_starts(run_dir)
    worlds = [s["world"] for s in starts]
    assert worlds[0] == 4 and 3 in worlds and worlds[-1] == 4, starts
    shrunk = starts[shrunk_at - 1]
    assert (shrunk["dp"], shrunk["local_batch"] * shrunk["accumulation"]) == (3, 4)  # 12 = 3 x 4
    # Growing back waits for a checkpoint boundary: it resumes from the step it stopped at, losing none.
    grew = starts[-1]
    assert grew["cause"].startswith("grew after the checkpoint of step"), grew
    assert grew["lost_steps"] == 0 and grew["resumed_step"] % 2 == 0, grew
    print(f"grow: {grew['seconds_since_grow_stop']:.1f}s from the stop at step {grew['resumed_step']} to the start "
          f"on 4 workers; timings {grew['timings']}")
    assert sorted(outcome["losses"]) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert abs(outcome["losses"][step] - loss) / loss < 1e-4, (step, outcome["losses"][step], loss)
