"""Fault tolerance through Ray: injected worker deaths, deaths mid-save, and giving up cleanly."""

import os
import threading
import time

import pytest
import ray

import raytitan
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.checkpoint.layout import committed_steps, read_commit
from raytitan.ray.launcher import TrainingFailed
from raytitan.trainer.elastic.fault import injected_faults
from raytitan.trainer.elastic.history import read_starts

from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow


def train(root, data_dir, **overrides):
    settings = dict(
        job__dump_folder=str(root), ray__num_workers=4, ray__resources_per_worker="CPU=0.25",
        ray__max_failures=2, training__steps=8, training__seq_len=64, training__global_batch_size=8,
        training__local_batch_size=2, training__dataset="files", training__dataset_path=data_dir,
        training__deterministic=True, checkpoint__interval=2, metrics__log_freq=1,
        metrics__enable_tensorboard=False, lr_scheduler__warmup_steps=2,
    )
    settings.update(overrides)
    result = raytitan.fit(None, **settings)
    run_dir = raytitan.load_config(None, **settings).run_dir
    final = {}
    for line in raytitan.read_metrics(run_dir):
        if "loss" in line:
            final[line["step"]] = line["loss"]  # after a restart, the re-run step's value wins
    return result, run_dir, final


@pytest.fixture(scope="module")
def seed_weights(tmp_path_factory, data_dir):
    """Initial weights from one process, so layouts that initialize differently start the same."""
    root = str(tmp_path_factory.mktemp("seed"))
    run_ranks(tiny_config(root, data_dir, checkpoint={"create_seed_checkpoint": True}), 1, root)
    return os.path.join(root, "run", "checkpoint", "step-0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, seed_weights):
    """The same run on 2 plain gloo ranks (no Ray, no faults, 2 x 2 rows x 2 microbatches): what
    every Ray run must reproduce, whatever its world size."""
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    config = tiny_config(root, data_dir, training={"steps": 8, "global_batch_size": 8, "local_batch_size": 2},
                         checkpoint={"initial_load_path": seed_weights, "enable": False})
    return dict(enumerate(run_ranks(config, 2, root)["losses"], start=1))


def assert_same_losses(got, expected):
    assert sorted(got) == sorted(expected) == list(range(1, len(expected) + 1))
    for step in expected:
        assert abs(got[step] - expected[step]) / expected[step] < 1e-4, (step, got, expected)


class FeederKiller(threading.Thread):
    """Kills the run's train data feeder actor through Ray once the run completed ``at_step``."""

    def __init__(self, run_dir: str, at_step: int):
        super().__init__(daemon=True)
        self.run_dir, self.at_step = run_dir, at_step
        self.killed_after: int | None = None  # the step completed when the feeder was killed
        self.restarted = False
        self.done = threading.Event()

    def run(self) -> None:
        from raytitan.ray.launcher import FEEDER_PREFIX
        from raytitan.trainer.elastic.history import read_progress

        while not self.done.wait(0.05):
            step = (read_progress(self.run_dir) or {}).get("step", 0)
            feeders = [n for n in ray.util.list_named_actors() if n.startswith(FEEDER_PREFIX + "train-")]
            if step >= self.at_step and feeders:
                feeder = ray.get_actor(feeders[0])
                ray.kill(feeder, no_restart=False)  # as if its process died; Ray may restart it
                self.killed_after = step
                print(f"data feeder {feeders[0]} killed after step {step} at {time.strftime('%H:%M:%S')}", flush=True)
                self.restarted = ray.get(feeder.stats.remote(), timeout=120) is not None  # it answers again
                return


def test_worker_killed_mid_run_resumes_with_the_same_math(ray_local, tmp_path, data_dir, uninterrupted,
                                                          seed_weights):
    """An elastic TP=2 run through Ray with memory snapshots every step and disk checkpoints only
    at the end: the ranks of a TP group share their data slice from the feeder; a worker killed at
    a seeded step (5, rank 2) costs at most one step: the rebuilt group (one TP pair, 4 -> 2 ranks)
    resumes from the newest memory snapshot, resharded, with the same math as plain data parallel
    on 4 ranks without faults. The data feeder actor, killed through Ray after step 2, is
    restarted by Ray at the cursors the ranks ask for: the same rows (same losses), and no
    restart of the worker group."""
    killer = FeederKiller(str(tmp_path / "llama3-debugmodel"), at_step=2)
    killer.start()
    try:
        result, run_dir, losses = train(tmp_path, data_dir, ray__min_workers=2, ray__max_workers=4,
                                        parallelism__tensor_parallel_degree=2, training__local_batch_size=4,
                                        checkpoint__initial_load_path=seed_weights, checkpoint__interval=10,
                                        checkpoint__memory_interval=1, fault__seed=9)
    finally:
        killer.done.set()
    assert killer.killed_after is not None and killer.killed_after < 8, "the feeder was not killed mid-run"
    assert killer.restarted
    assert_same_losses(losses, uninterrupted)
    starts = read_starts(run_dir)
    assert len(starts) == 2 and "injected fault: rank 2 killed at the start of step 5" in starts[1]["cause"]
    # Step 4's snapshot may still have been writing when step 5 began: then step 3's is the newest.
    assert starts[1]["resumed_from"] == "memory" and starts[1]["resumed_step"] in (3, 4)
    assert starts[1]["lost_steps"] <= 1 and starts[1]["lost_steps"] == 4 - starts[1]["resumed_step"]
    assert committed_steps(os.path.join(run_dir, "checkpoint")) == [8]  # no disk checkpoint before the end
    logged = [m for m in raytitan.read_metrics(run_dir) if "grad_norm" in m]
    assert logged and all(m["checkpoint/snapshots_skipped"] >= 0 for m in logged)  # the count is in the metrics
    assert starts[1]["seconds_since_failure"] > 0
    assert all(s["active"] == 2 * s["dp"] for s in starts)  # every active rank is in a TP pair
    assert result.checkpoint.path.endswith("step-8")  # Ray registered the final committed checkpoint


MOE = {"name": "qwen3_moe", "flavor": "debugmodel"}
MOE_STEPS = 4


@pytest.fixture(scope="module")
def moe_uninterrupted(tmp_path_factory, data_dir):
    """Qwen3-MoE debug seed weights from one process, then the same process training 4 steps from
    them with the whole global batch of 12 in one microbatch: the math every expert-parallel
    layout must reproduce (one spawn for both)."""
    root = str(tmp_path_factory.mktemp("moe"))
    seed = os.path.join(root, "seed", "run", "checkpoint", "step-0")
    _, one = run_ranks([
        tiny_config(os.path.join(root, "seed"), data_dir, model=MOE, checkpoint={"create_seed_checkpoint": True}),
        tiny_config(os.path.join(root, "one"), data_dir, model=MOE,
                    training={"steps": MOE_STEPS, "global_batch_size": 12, "local_batch_size": 12},
                    checkpoint={"initial_load_path": seed, "enable": False}),
    ], 1, root)
    return seed, dict(enumerate(one["losses"], start=1))


class CapacityClaim(threading.Thread):
    """Another job on the node: it registers with Ray's autoscaling coordinator (which Ray Train
    sizes elastic groups by) before the run, at Ray Train's priority, so it is served first; once
    the run completed ``after_step`` it claims all of the node's CPUs but ``keep``. The next
    worker group fits only what is left, as after losing a node."""

    REQUESTER = "another-job"

    def __init__(self, run_dir: str, after_step: int, keep: float):
        from raytitan.ray.launcher import autoscaling_coordinator

        super().__init__(daemon=True)
        self.run_dir, self.after_step, self.keep = run_dir, after_step, keep
        self.claimed_at: float | None = None
        self.done = threading.Event()
        self.coordinator = autoscaling_coordinator()
        self.request(resources=[])

    def request(self, resources: list[dict]) -> None:
        from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import ResourceRequestPriority

        ray.get(self.coordinator.request_resources.remote(
            requester_id=self.REQUESTER, resources=resources, expire_after_s=600,
            priority=ResourceRequestPriority.HIGH))

    def run(self) -> None:
        from raytitan.trainer.elastic.history import read_progress

        while not self.done.wait(0.05):
            if (read_progress(self.run_dir) or {}).get("step", 0) >= self.after_step:
                self.request([{"CPU": ray.cluster_resources()["CPU"] - self.keep}])
                self.claimed_at = time.time()
                return

    def release(self) -> None:
        self.done.set()
        self.join()
        ray.get(self.coordinator.cancel_request.remote(self.REQUESTER))


def test_an_expert_parallel_run_loses_a_worker_and_re_plans_its_experts(ray_local, tmp_path, data_dir,
                                                                       moe_uninterrupted):
    """Qwen3-MoE on 4 Ray workers with expert parallel 2 (each rank 4 of the 8 experts of every
    layer, FSDP-sharded over 2 ranks), global batch 12: after step 1 another job takes all but 3
    workers' room; rank 1 is killed at the start of step 3. The restarted group has 3 workers;
    2 does not divide 3 shard ranks, so expert parallel is re-planned to 1 (every rank all 8
    experts, FSDP-sharded over 3), and step 2's checkpoint, saved with 4 experts a rank, reshards
    through DCP. Every step's loss is one process's from the same seed weights (1e-4)."""
    seed, reference = moe_uninterrupted
    claim = CapacityClaim(str(tmp_path / "qwen3_moe-debugmodel"), after_step=1, keep=3 * 0.25)
    claim.start()
    try:
        result, run_dir, losses = train(
            tmp_path, data_dir, model__name=MOE["name"], model__flavor=MOE["flavor"], ray__min_workers=2,
            ray__max_workers=4, parallelism__expert_parallel_degree=2, training__steps=MOE_STEPS,
            training__global_batch_size=12, training__local_batch_size=3, checkpoint__initial_load_path=seed,
            fault__kill_step=3, fault__kill_rank=1)
    finally:
        claim.release()
    assert_same_losses(losses, reference)
    [fault] = injected_faults(run_dir)
    assert claim.claimed_at is not None and claim.claimed_at < fault["time"], "the capacity was claimed too late"
    starts = read_starts(run_dir)
    assert len(starts) == 2 and starts[1]["cause"] == "injected fault: rank 1 killed at the start of step 3"
    assert [(s["world"], s["active"], s["dp"], s["local_batch"] * s["accumulation"]) for s in starts] == \
        [(4, 4, 4, 3), (3, 3, 3, 4)]  # the global batch stays 12
    assert (starts[1]["resumed_step"], starts[1]["resumed_from"], starts[1]["lost_steps"]) == (2, "disk", 0)
    folder = os.path.join(run_dir, "checkpoint")
    assert committed_steps(folder) == [2, 4]
    saved_under = {step: read_commit(folder, step) for step in (2, 4)}
    assert (saved_under[2]["world_size"], saved_under[2]["parallelism"]["ep"]) == (4, 2)
    assert (saved_under[4]["world_size"], saved_under[4]["parallelism"]["ep"]) == (3, 1)
    assert result.checkpoint.path.endswith("step-4")


def test_too_many_failures_end_the_run_with_checkpoints_intact(ray_local, tmp_path, data_dir):
    with pytest.raises(TrainingFailed, match=r"(?s)max_failures.*newest committed checkpoint: .*step-4"):
        train(tmp_path, data_dir, ray__num_workers=2, ray__resources_per_worker="CPU=0.5", ray__max_failures=0,
              fault__kill_step=5, fault__kill_rank=0)
    folder = os.path.join(str(tmp_path), "llama3-debugmodel", "checkpoint")
    assert committed_steps(folder) == [2, 4]
    import torch

    from raytitan.models.llama3.args import FLAVORS
    from raytitan.models.llama3.model import Transformer

    import dataclasses

    model = Transformer(dataclasses.replace(FLAVORS["debugmodel"], vocab_size=259, max_seq_len=64))
    CheckpointManager(folder, {"model": ModelState([model])}, 0).load_path(os.path.join(folder, "step-4"), True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


CUSTOM_MODEL = {"name": "examples.custom_model:spec", "flavor": "debugmodel"}


@pytest.fixture(scope="module")
def custom_model_runs(tmp_path_factory, data_dir):
    """A user's own model (examples/custom_model, GPT-2-style): seed weights from one process, then
    6 steps from them on 2 plain gloo ranks in one spawn, as FSDP (the reference), TP, PP and CP."""
    root = str(tmp_path_factory.mktemp("custom_model"))
    run_ranks(tiny_config(os.path.join(root, "seed"), data_dir, model=CUSTOM_MODEL,
                          checkpoint={"create_seed_checkpoint": True}), 1, root)
    seed = os.path.join(root, "seed", "run", "checkpoint", "step-0")
    layouts = {"FSDP": {}, "TP": {"tensor_parallel_degree": 2}, "PP": {"pipeline_parallel_degree": 2},
               "CP": {"context_parallel_degree": 2}}
    results = run_ranks([tiny_config(os.path.join(root, name), data_dir, model=CUSTOM_MODEL, parallelism=p,
                                     training={"steps": 6, "global_batch_size": 8, "local_batch_size": 2},
                                     checkpoint={"initial_load_path": seed, "enable": False})
                         for name, p in layouts.items()], 2, root)
    return seed, {name: dict(enumerate(r["losses"], start=1)) for name, r in zip(layouts, results)}


def test_a_users_own_model_trains_through_ray_and_resumes_after_a_worker_kill(ray_local, tmp_path, data_dir,
                                                                             custom_model_runs):
    """model.name = examples.custom_model:spec (the user's own spec, imported on the workers)
    trains on 2 Ray workers with FSDP; a worker killed after writing its part of step 4's
    checkpoint, before the commit, leaves step 2 the newest committed one: steps 3 and 4 are
    redone, and every step's loss (the redone ones' both times) is the plain-gloo reference's,
    exactly. Under TP, PP and CP the model trains like the reference too."""
    seed, reference = custom_model_runs
    for layout in ("TP", "PP", "CP"):
        assert sorted(reference[layout]) == list(range(1, 7)), layout
        for step, loss in reference[layout].items():
            assert abs(loss - reference["FSDP"][step]) / loss < 1e-5, (layout, reference)
    result, run_dir, losses = train(tmp_path, data_dir, model__name=CUSTOM_MODEL["name"], ray__num_workers=2,
                                    ray__resources_per_worker="CPU=0.5", training__steps=6,
                                    checkpoint__initial_load_path=seed, fault__kill_step=4, fault__kill_rank=1,
                                    fault__during_save=True)
    assert os.path.basename(run_dir) == "examples.custom_model.spec-debugmodel"
    assert losses == reference["FSDP"]
    logged = [(m["step"], m["loss"]) for m in raytitan.read_metrics(run_dir) if "loss" in m]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 3, 4, 5, 6] and logged[2:4] == logged[4:6]
    starts = read_starts(run_dir)
    assert len(starts) == 2 and "killed during the save of step 4, before its commit" in starts[1]["cause"]
    assert starts[1]["resumed_step"] == 2 and starts[1]["lost_steps"] == 2  # step 4 never committed
    assert committed_steps(os.path.join(run_dir, "checkpoint"))[-1] == 6
    assert result.checkpoint.path.endswith("step-6")


def test_capacity_probe_places_what_fits_and_probes_nothing_without_room(ray_local, monkeypatch):
    """The grow check at a checkpoint: as many workers as Ray can place now, found by placing them;
    with no room for one more, no placement group is tried (each would stall the step)."""
    import importlib

    from raytitan.ray.runtime import RayRuntime

    placement_groups = importlib.import_module("ray.util.placement_group")  # the module, not ray.util's function

    free = int(ray.available_resources().get("CPU", 0))
    assert free >= 1
    tried = []
    place = placement_groups.placement_group
    monkeypatch.setattr(placement_groups, "placement_group", lambda *a, **k: tried.append(a) or place(*a, **k))
    assert RayRuntime({}, {"CPU": free + 1.0}, 8).spare_workers(3) == 0 and tried == []
    assert RayRuntime({}, {"CPU": 1.0}, 8).spare_workers(8) == free and len(tried) == free


def test_a_second_run_on_a_live_runs_folder_is_refused_before_ray_starts(tmp_path, data_dir, capsys):
    """python -m raytitan.train on a folder whose lease a live run holds: exit 1 naming the holder,
    before anything is written there or Ray is started."""
    from raytitan import train as entry
    from raytitan.components.lease import RunLease

    run_dir = tmp_path / "llama3-debugmodel"
    holder = RunLease.acquire(str(run_dir), kind="the Ray driver")  # this process: alive
    try:
        code = entry.main(["--job.dump_folder", str(tmp_path), "--training.dataset", "files",
                           "--training.dataset_path", data_dir])
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert code == 1 and "training refused: run folder" in err, err
    assert f"the Ray driver pid {os.getpid()} on host" in err
    assert not (run_dir / "config.toml").exists()


def listening(port: int) -> dict[str, str]:
    """The TCP sockets listening at ``port`` on this machine (IPv4 and IPv6): address -> inode."""
    import ipaddress

    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found[str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)] = fields[9]
    return found


def owner_environment(inode: str) -> dict[str, str]:
    """The environment of the process holding the socket ``inode``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/environ", "rb") as f:
                    return dict(v.decode().partition("=")[::2] for v in f.read().split(b"\0") if v)
        except OSError:  # gone, or another user's
            continue
    raise AssertionError(f"no process holds socket {inode}")


def test_a_local_ray_instance_listens_on_loopback_only_with_token_auth(ray_local):
    """The instance raytitan starts without an address (conftest's ray_local starts it the same
    way, raytitan.ray.launcher.start_local_ray): its node address is 127.0.0.1, every port of its
    node listens there and nowhere else, and token authentication was switched on for it."""
    [node] = [n for n in ray.nodes() if n["Alive"]]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == "127.0.0.1"
    ports = {"GCS": int(gcs_port), **{k: node[k] for k in ("NodeManagerPort", "ObjectManagerPort",
                                                          "MetricsExportPort", "RuntimeEnvAgentPort") if node.get(k)}}
    for name, port in ports.items():
        assert set(listening(port)) == {"127.0.0.1"}, (name, port, listening(port))
    # The GCS, which every caller talks to first, runs with token authentication.
    assert owner_environment(listening(int(gcs_port))["127.0.0.1"]).get("RAY_AUTH_MODE") == "token"
