"""Ray layer: connect to (or start) Ray, start the data feeder and a TorchTrainer, summarize.

Everything Ray-specific lives here; the workers run ``raytitan.trainer.worker.run`` with a
``RayRuntime`` instead of the torchrun one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raytitan.components.checkpoint.layout import committed_steps, newest_readable_step, step_dir
from raytitan.config.job import ConfigError, JobConfig, to_toml
from raytitan.ray.data_feed import DataFeeder, Relays, replay_batches
from raytitan.trainer.elastic.growth import GrowRequestError, read_grow_request
from raytitan.components.metrics import METRICS_FILE, read_metrics
from raytitan.ray import progress
from raytitan.components import storage
from raytitan.components.lease import RunLease
from raytitan.config.plan import data_parallel_degree, plan_run
from raytitan.models import get_spec, source_root
from raytitan.models.spec import build_meta, count_params
from raytitan.trainer.elastic.history import PROGRESS_FILE, ProgressMarkerError, failures_in, read_progress
from raytitan.ray.runtime import train_worker
from raytitan.ray.signals import DriverStop, TrainingStopped
from raytitan.ray.snapshots import SnapshotStores, check_memory
from raytitan.trainer.runtime import process_started_at, setup_logging

logger = logging.getLogger("raytitan")

# CPUs the Ray Data pipeline needs that training workers must leave free (two 0.5-CPU packers).
DATA_CPUS = 1.0
# Ray Train's record of reported checkpoints in the run folder: a private name of Ray 2.60
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME), checked by
# tests/test_private_apis.py.
RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"
# One line per launch of the run: when the driver's process started, when it began launching,
# and when it had Ray (start-up before any worker exists; benchmarks/ray_overhead.py reads it).
LAUNCHES_FILE = "launches.jsonl"
# A local Ray instance listens here only.
LOOPBACK = "127.0.0.1"
AUTH_MODE_VAR = "RAY_AUTH_MODE"  # Ray's switch for token authentication
# Ray Train's wait for a worker group's placement group (read by its controller, which gets the
# driver's RAY_TRAIN_* variables); raytitan sets it from ray.worker_group_start_timeout_s.
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How often Ray Train's controller polls the workers (the same way): raytitan sets it from
# ray.health_check_interval_s.
HEALTH_CHECK_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Ray Train's preemption watcher, an actor per launch that gathers node-drain notices for
# ray.train.get_preemption_info, which raytitan does not read (docs/elastic.md): off, unless the
# variable is set.
PREEMPTION_WATCHER_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _connect(config: JobConfig) -> None:
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # On a cluster raytitan comes from the nodes' install or the job's working_dir: passing
        # a runtime_env here would replace the one `ray job submit` set up.
        ray.init(address=address, log_to_driver=True)
    else:
        # The workers find raytitan through the environment the Ray processes start with, not a
        # runtime_env: Ray then starts every actor in a plain worker process (one it may have
        # started ahead), without asking its runtime-env agent for each (docs/performance.md).
        with _environment(PYTHONPATH=worker_import_path(config)):
            start_local_ray()


@contextlib.contextmanager
def _environment(**variables: str):
    """These environment variables for the Ray processes started inside, then as they were."""
    before = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local_ray(**init_args) -> None:
    """Start a Ray instance for this machine alone: every Ray process listens on 127.0.0.1 only
    (no port of it is reachable from the network), and callers must present Ray's auth token.

    Token authentication is switched on here, not left to Ray's default for new local instances
    (Ray 2.60 turns it on unless ``RAY_AUTH_MODE`` says otherwise; a later version may not). An
    explicit ``RAY_AUTH_MODE=disabled`` is respected, with a warning. The token is Ray's own
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, which Ray creates)."""
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is None:
        _switch_on_token_auth()
    elif mode.lower() != "token":
        logger.warning("%s=%s: the local Ray instance starts without token authentication; any process on this "
                       "machine can run code in it", AUTH_MODE_VAR, mode)
    with _loopback_node_address():
        ray.init(_node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **init_args)


def _switch_on_token_auth() -> None:
    """Set ``RAY_AUTH_MODE=token`` for this process and the Ray processes it starts. Ray reads the
    variable into its config when it is imported, so the config is read again: Ray 2.60's own way
    (``ray._raylet.Config.initialize``, private; tests/test_private_apis.py checks it)."""
    from ray._raylet import Config

    os.environ[AUTH_MODE_VAR] = "token"
    Config.initialize("")


@contextlib.contextmanager
def _loopback_node_address():
    """Ray 2.60 turns a node address of 127.0.0.1 into the machine's outward address, unless it
    was told that this machine forms no cluster (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``,
    set from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when Ray is imported; private, checked by
    tests/test_private_apis.py). Told so for the start only: its processes then bind 127.0.0.1."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def worker_import_path(config: JobConfig) -> str:
    """PYTHONPATH for a local instance's workers: they import raytitan, and a model spec of the
    user's own (``model.name = package.module:attribute``), from where the driver does."""
    return os.pathsep.join(dict.fromkeys(filter(None, [import_root(), source_root(config.model.name),
                                                       os.environ.get("PYTHONPATH")])))


def import_root() -> str:
    """The folder that holds the raytitan package (never the package itself: its ``ray``
    folder would shadow Ray)."""
    layer = os.path.dirname(os.path.abspath(__file__))  # raytitan/ray
    return os.path.dirname(os.path.dirname(layer))


def _worker_resources(config: JobConfig) -> dict:
    """Per-worker resources; by default on CPU, an equal share of what the data pipeline leaves."""
    workers = config.ray.worker_range[1]
    if config.ray.resources_per_worker:
        resources = dict(config.ray.resources_per_worker)
    elif config.ray.use_gpu:
        resources = {"CPU": 1.0, "GPU": 1.0}
    else:
        total = ray.cluster_resources().get("CPU", 0.0)
        resources = {"CPU": max(0.1, round((total - DATA_CPUS) / workers, 2))}
    # Checked at the smallest size: an autoscaling cluster may not have the capacity for more yet.
    fewest = config.ray.worker_range[0]
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    spare = total_cpus - resources.get("CPU", 1.0) * fewest
    if spare < DATA_CPUS - 1e-6:
        raise ConfigError(
            f"ray.resources_per_worker: {fewest} workers x {resources.get('CPU', 1.0)} CPU leave "
            f"{spare:.2f} of the cluster's {total_cpus:g} CPUs for the data pipeline, which needs {DATA_CPUS:g}; "
            "lower the per-worker CPU share or add CPUs (a starved pipeline would hang training)"
        )
    return resources


def launch(config: JobConfig) -> ray.train.Result:
    """Validate, start the workers through Ray Train, wait, and print a summary."""
    setup_logging(rank=0)
    config = config.with_absolute_paths()
    storage.use_root(config.ray.storage_path)
    lo, hi = config.ray.worker_range
    if config.ray.elastic and config.training.global_batch_size == -1:
        # Fix the global batch once, at the largest world: it must not change when the world does.
        config.training.global_batch_size = config.training.local_batch_size * data_parallel_degree(config, hi)
    plan = plan_run(config, hi)  # every config error surfaces here, before Ray starts
    if lo != hi:
        smallest = plan_run(config, lo, resolve_data=False)  # the shards and the log lines of the plan above
        print(f"elastic: {lo}..{hi} workers; at {lo}: {smallest.dims.summary}, local {smallest.local_batch_size} x "
              f"accumulation {smallest.accumulation_steps}", flush=True)
    print(f"resolved config:\n{to_toml(config)}", flush=True)
    # One writer per run folder, held across every restart of the worker group (raytitan.components.lease).
    with RunLease.acquire(config.run_dir, kind="the Ray driver") as lease:
        return _launch(config, plan, lease)


def _launch(config: JobConfig, plan, lease: RunLease) -> ray.train.Result:
    storage.write_text(storage.join(config.run_dir, "config.toml"), to_toml(config))
    os.environ[START_TIMEOUT_VAR] = str(config.ray.worker_group_start_timeout_s)
    os.environ[HEALTH_CHECK_VAR] = str(config.ray.health_check_interval_s)
    os.environ.setdefault(PREEMPTION_WATCHER_VAR, "0")
    launched_at = time.time()
    _connect(config)
    launch_id = uuid.uuid4().hex[:8]
    storage.append_text(storage.join(config.run_dir, LAUNCHES_FILE), json.dumps(
        {"launch": launch_id, "process_started_at": process_started_at(), "launched_at": launched_at,
         "ray_ready_at": time.time()}) + "\n")
    resources = _worker_resources(config)
    replay = replay_batches(config.checkpoint.interval, plan.global_batch_size, config.training.seq_len)
    feeders = {"train": start_feeder(f"train-{launch_id}", plan.shards, config.model, config.training.seq_len,
                                     config.training.seed, plan.global_batch_size, config.training.shuffle_buffer,
                                     4, replay)}
    if config.validation.enable:
        feeders["validation"] = start_feeder(
            f"validation-{launch_id}", plan.validation_shards, config.model, config.training.seq_len,
            config.training.seed, config.validation.local_batch_size * plan.dims.dp, 0, 4, 0,
            VALIDATION_PACKERS, 0.0)
    if starts_at_the_beginning(config):
        feeders["train"].warm_start.remote()
    # A relay per node: the feeders answer nodes, not ranks.
    relays = Relays(launch_id, {purpose: f"{FEEDER_PREFIX}{purpose}-{launch_id}" for purpose in feeders})
    relays.ensure(NodeWatch.alive())
    stores = start_snapshot_stores(config, plan, launch_id)

    def joined(nodes: set[str]) -> None:  # a node that joins gets a relay and, with snapshots, a store
        relays.ensure(nodes)
        if stores:
            stores.ensure(nodes)

    t0 = time.perf_counter()
    wanted = progress.wanted(config.metrics.progress_bar)
    bar = progress.ProgressBar(config.run_dir, config.training.steps) if wanted else None
    stop = DriverStop(config).install()  # SIGTERM, SIGINT: the workers stop at a step they save
    result = None
    try:
        attempts: set[str] = set()  # this launch's; restarts of earlier launches are not counted
        while not stop.requested:
            # The workers name this id in a grow request and their restart records: no clocks compared.
            attempt = uuid.uuid4().hex[:12]
            _forget_ray_checkpoint_list(config)
            failures_left = config.ray.max_failures - failures_in(config.run_dir, attempts)
            attempts.add(attempt)
            trainer = _trainer(config, feeders, resources, failures_left=failures_left, attempt=attempt,
                               snapshot_stores=stores and stores.launch, relays=relays.launch)
            try:
                # A lost node refreshes the view Ray Train sizes the next group from; a new one gets a relay (a store).
                with NodeWatch(on_join=joined):
                    result = stop.run(attempt, trainer.fit, end_if=lambda: lease.lost)
            except TrainingStopped:
                raise
            except Exception as e:  # Ray raises once restarts are exhausted
                raise TrainingFailed(failure_message(config, e, attempts)) from e
            grow = None if stop.requested else _grow_request(config, attempt)
            if grow is None:
                break
            print(f"growing: step {grow['step']} is committed; starting again with up to {grow['target']} workers "
                  f"(was {grow['world']})", flush=True)
            _refresh_ray_cluster_view()
    finally:
        stop.restore()
        if bar:
            bar.close()
        relays.close()
        for feeder in feeders.values():
            ray.kill(feeder)
        if stores:
            stores.close()
        if stop.aborted:
            ray.shutdown()  # ends this job's actors now: Ray Train's controller and the workers
    if stop.requested:
        stop.conclude()  # raises TrainingStopped, unless the run reached training.steps all the same
    if not config.checkpoint.create_seed_checkpoint:  # a seed run saves step 0 and trains nothing
        check_reached_steps(config)
    print(summary(config, result, time.perf_counter() - t0), flush=True)
    return result


def start_snapshot_stores(config: JobConfig, plan, launch_id: str) -> SnapshotStores | None:
    """A memory-snapshot store on every node (``checkpoint.memory_interval``), once the memory they
    need fits (else a ``ConfigError`` with the numbers, before any worker starts)."""
    c = config.checkpoint
    if not (c.enable and c.memory_interval > 0):
        return None
    n_params, _ = count_params(build_meta(get_spec(config.model.name), plan.model_args))
    memory = {n["NodeID"]: n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")}
    try:
        print(check_memory(n_params, c.memory_replicas, memory, c.memory_max_node_share), flush=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stores = SnapshotStores(launch_id)
    stores.ensure(set(memory))
    return stores


# Validation reads while training waits for it: its one packing actor reserves no CPU and uses
# what the training pipeline's packers leave idle then (they stop at their read-ahead gate). With
# CPUs reserved it could find none: the training pool may hold all of the data share.
VALIDATION_PACKERS = 1
FEEDER_PREFIX = "raytitan-feeder-"  # the feeder actors' names: FEEDER_PREFIX + purpose-launch id


def start_feeder(name: str, *args):
    """A ``DataFeeder`` actor named ``FEEDER_PREFIX + name`` (a drill or an operator finds it by it).

    The feeders hold the data stream for every restart of the group: on the driver's node (the
    head node under `ray job submit`), never on a worker node whose loss would take them along.
    If the feeder's process dies (killed, out of memory), Ray starts it again and sends it the
    requests in flight once more (``max_restarts``, ``max_task_retries``): each rank's request names
    the cursor it wants, so the new feeder restarts its pipeline there and the ranks get the very
    rows they would have got; training waits for the pipeline's start, the worker group is not
    restarted. The feeder holds nothing a restart could lose: the cursor lives in the checkpoints."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(DataFeeder).options(
        name=FEEDER_PREFIX + name, num_cpus=0, max_concurrency=64, scheduling_strategy=here,
        max_restarts=-1, max_task_retries=-1,
    ).remote(*args)


def starts_at_the_beginning(config: JobConfig) -> bool:
    """Whether the run's data stream starts at its first sample: nothing to resume from, and no
    initial load that brings a data position."""
    c = config.checkpoint
    if c.enable and committed_steps(storage.join(config.run_dir, c.folder)):
        return False
    return not c.initial_load_path or c.initial_load_model_only or "dataloader" in c.exclude_from_loading


def _grow_request(config: JobConfig, attempt: str) -> dict | None:
    """The grow request this attempt's workers left, if any. One that cannot be read is reported
    and not acted on: whether the run is finished is then told by ``check_reached_steps``."""
    try:
        return read_grow_request(config.run_dir, attempt=attempt)
    except GrowRequestError as e:
        logger.warning("%s: not starting the workers again for it; if the run stopped short of training.steps "
                       "it fails below, and running the same command again resumes it", e)
        return None


def check_reached_steps(config: JobConfig) -> int:
    """The step the run reached; raises TrainingFailed if that is short of training.steps.

    The authority is the progress marker, which rank 0 rewrites after every completed step (the
    last one and every checkpoint step included, also on an object store). A committed checkpoint
    proves its step was completed too: it stands in where the marker is missing or unreadable.
    Ray reports no error when the workers return early (e.g. at a checkpoint boundary to grow,
    with the grow request lost), so without this check such a run would look finished."""
    target = config.training.steps
    marker = storage.join(config.run_dir, PROGRESS_FILE)
    try:
        progress = read_progress(config.run_dir)
        marked, note = (progress["step"], "") if progress else (None, f"no progress marker {marker}")
    except ProgressMarkerError as e:
        logger.warning("%s: telling from the committed checkpoints whether the run reached training.steps", e)
        marked, note = None, str(e)
    folder = storage.join(config.run_dir, config.checkpoint.folder)
    steps = committed_steps(folder)
    reached = max([s for s in (marked, steps[-1] if steps else None) if s is not None], default=None)
    if reached is not None and reached >= target:
        return reached
    where = (f"newest committed checkpoint: {step_dir(folder, steps[-1])}; run the same command again to resume "
             "from it" if steps else "no committed checkpoint: run the same command again to start it over")
    done = f"stopped at step {reached} " if reached is not None else "completed no step "
    raise TrainingFailed(
        f"run {config.run_name} {done}of training.steps = {target}, although its workers reported no error "
        f"(e.g. they stopped at a checkpoint to grow and the launcher found no grow request){'; ' + note if note else ''}"
        f"\n{where}")


def _forget_ray_checkpoint_list(config: JobConfig) -> None:
    """Drop Ray Train's list of reported checkpoints from the run folder before a new start.

    raytitan resumes from its own committed steps, not from Ray's list; and that list still names
    steps that checkpoint.keep_latest_k has since deleted, which Ray refuses to start with."""
    path = storage.join(config.run_dir, RAY_CHECKPOINT_LIST)
    if storage.isfile(path):
        storage.remove(path)


def autoscaling_coordinator():
    """The actor Ray Train's elastic scaling asks for the cluster's nodes. The one use of this private
    API (Ray 2.60: ``ray.data._internal.cluster_autoscaler``); tests/test_private_apis.py checks it
    and the ``get_reserved_resources(requester_id, recompute)`` method called on it."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    return get_or_create_autoscaling_coordinator()


def _refresh_ray_cluster_view() -> None:
    """Ray Train sizes a new group from its autoscaling coordinator's view of the nodes, refreshed
    every 20 s; refresh it now, so the grown group sees the capacity the workers found."""
    try:
        coordinator = autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("raytitan", recompute=True), timeout=30)
    except Exception as e:  # a Ray version without it: the group may come back smaller and grow again
        logger.warning("could not refresh Ray's view of the cluster before growing (%s: %s)", type(e).__name__, e)


class NodeWatch:
    """While a group trains, watch the cluster's nodes; when one dies, refresh the autoscaling
    coordinator's view at once. Ray Train sizes the restarted group from that view, which the
    coordinator otherwise refreshes only every 20 s: a group sized with the dead node's slots waits
    its whole start timeout for them before Ray Train decides again."""

    def __init__(self, interval_s: float = 1.0, on_join=None):
        self.interval_s, self.on_join = interval_s, on_join  # on_join(alive node ids): nodes joined
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="raytitan-node-watch", daemon=True)

    def __enter__(self) -> "NodeWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=5)

    @staticmethod
    def alive() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def _watch(self) -> None:
        try:
            known = self.alive()
            while not self.done.wait(self.interval_s):
                now = self.alive()
                if lost := known - now:
                    logger.warning("node(s) %s left the cluster: refreshing Ray's view before the group restarts",
                                   ", ".join(sorted(n[:8] for n in lost)))
                    _refresh_ray_cluster_view()
                if now - known and self.on_join:
                    try:
                        self.on_join(now)
                    except Exception as e:  # its ranks then ask the feeder itself, keep snapshot parts elsewhere
                        logger.warning("could not start a data relay or snapshot store on the new node(s) (%s: %s)",
                                       type(e).__name__, e)
                known = now
        except Exception as e:  # never the run's failure: Ray Train decides again after its start timeout
            logger.warning("the node watch stopped (%s: %s)", type(e).__name__, e)


def _trainer(config: JobConfig, feeders: dict, resources: dict, failures_left: int,
             attempt: str | None = None, snapshot_stores: str | None = None, relays: str | None = None) -> TorchTrainer:
    lo, hi = config.ray.worker_range
    # Ray's experiment folder is the run folder; on an object store, through the same filesystem.
    filesystem, parent = storage.resolve(config.run_dir.rsplit("/", 1)[0])
    bundle = dict(resources)
    if config.ray.use_gpu:
        bundle.setdefault("GPU", 1.0)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "feeders": feeders, "worker_bundle": bundle, "max_workers": hi,
                           "attempt": attempt, "snapshot_stores": snapshot_stores, "relays": relays},
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(lo, hi) if lo != hi else hi, use_gpu=config.ray.use_gpu, resources_per_worker=resources,
            # Ray would restart a running group as soon as capacity returns, losing the steps since
            # the last checkpoint; the workers grow at a checkpoint boundary instead (raytitan.trainer.elastic.growth).
            elastic_resize_monitor_interval_s=float("inf"),
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=parent,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max(0, failures_left)),
        ),
    )


class TrainingFailed(RuntimeError):
    """The run stopped for good (more failures than ray.max_failures, or short of training.steps);
    its checkpoints are intact."""


def failure_message(config: JobConfig, error: Exception, attempts: set[str] = frozenset()) -> str:
    folder = storage.join(config.run_dir, config.checkpoint.folder)
    newest = newest_readable_step(folder)
    where = f"newest committed checkpoint: {step_dir(folder, newest)}" if newest is not None else "no committed checkpoint"
    if (cause := repeating_cause(config, error, attempts)) is not None:
        return f"run {config.run_name} failed: {cause}\n{where}; fix that, then run the same command again to resume"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_line = " ".join(lines[:2]) if lines else type(error).__name__
    return (f"run {config.run_name} failed after using its {config.ray.max_failures} allowed restarts "
            f"(ray.max_failures): {first_line}\n{where}; run the same command again to resume from it")


def repeating_cause(config: JobConfig, error: Exception, attempts: set[str]) -> str | None:
    """The cause of a failure that a restart repeats (a non-finite step this launch stopped on, data
    that make no batch), said plainly: the restarts Ray spent on it refused at once."""
    import json

    from raytitan.ray.data_feed import data_source_error
    from raytitan.trainer.worker import NONFINITE_FILE

    marker = storage.join(config.run_dir, NONFINITE_FILE)
    if storage.isfile(marker):
        with contextlib.suppress(ValueError):
            stop = json.loads(storage.read_text(marker))
            if stop.get("attempt") in attempts:
                return stop["error"]
    if (data_error := data_source_error(error)) is not None:
        return f"data error: {data_error}"
    return None


def summary(config: JobConfig, result: ray.train.Result, seconds: float) -> str:
    logged = [m for m in read_metrics(config.run_dir) if "loss" in m]
    m = logged[-1] if logged else (result.metrics or {})
    lines = [
        "=" * 72,
        f"run {config.run_name} finished in {seconds:.1f}s: {config.job.description}",
        f"  steps        {m.get('step', '?')} / {config.training.steps}",
        f"  tokens seen  {m.get('tokens_seen', '?')}",
        f"  final loss   {m['loss']:.4f}" if "loss" in m else "  final loss   ?",
        f"  checkpoints  {storage.join(config.run_dir, config.checkpoint.folder)}",
        f"  metrics      {storage.join(config.run_dir, METRICS_FILE)}",
    ]
    if result.checkpoint:
        lines.append(f"  latest       {result.checkpoint.path}")
    if config.metrics.enable_tensorboard:
        lines.append(f"  tensorboard  tensorboard --logdir {os.path.join(config.local_dir, config.metrics.save_tb_folder)}")
    lines.append("=" * 72)
    return "\n".join(lines)
