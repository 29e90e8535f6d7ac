"""Per-worker entry: join the group, plan, build, restore, train.

Runs unchanged under Ray (``raytitan.ray``) and under
``torchrun --nproc_per_node N -m raytitan.worker [--section.key value ...]``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from raytitan.components import storage
from raytitan.components.checkpoint.layout import (
    CheckpointError, committed_steps, final_export, newest_readable_step, step_dir,
)
from raytitan.components.profiling import Profiler
from raytitan.config.job import ConfigError, JobConfig, parse_args
from raytitan.config.plan import RunPlan, plan_run
from raytitan.trainer.build import build, import_weights, is_torch_file
from raytitan.trainer.elastic.growth import GrowthCheck, new_control_group, request_grow
from raytitan.trainer.elastic.history import record_start, restart_metrics, write_progress
from raytitan.trainer.elastic.idle import agree_on_first_step, idle, workers_that_train
from raytitan.trainer.elastic.stop import EXIT_STOPPED, StopCheck
from raytitan.trainer.loop import NonFiniteError, Schedule, Trainer, TrainState
from raytitan.trainer.runtime import Runtime, TorchrunRuntime, process_started_at, setup_logging

logger = logging.getLogger("raytitan")

# In the run folder: the launch (attempt) whose workers stopped on a non-finite step, and why.
NONFINITE_FILE = "nonfinite.json"


@dataclass
class WorkerContext:
    """What every rank of the world agrees on before building: its place, the plan, the mesh and
    the process groups."""

    config: JobConfig
    runtime: Runtime
    device: torch.device
    rank: int
    world: int
    plan: RunPlan
    mesh: object  # DeviceMesh over the active ranks
    schedule: Schedule
    growth: GrowthCheck
    stop: StopCheck
    checkpoint_group: dist.ProcessGroup | None
    started_at: float
    timings: dict[str, float] = field(default_factory=dict)
    active_group: dist.ProcessGroup | None = None  # the ranks that train; None: all of them
    snapshot_folder: str | None = None  # where memory snapshots go (None: none are taken)
    snapshot_group: dist.ProcessGroup | None = None  # the CPU group their background writes coordinate on
    resumed_from: str | None = None  # "memory" or "disk": where ``restore`` found the state

    @property
    def active(self) -> int:
        """How many ranks train (the rest idle)."""
        return self.plan.dims.world_size

    @property
    def checkpoint_folder(self) -> str:
        return storage.join(self.config.run_dir, self.config.checkpoint.folder)


def start(config: JobConfig, runtime: Runtime) -> WorkerContext:
    """Join the process group and make the collectives every rank takes part in, idle ones too."""
    started_at, t0 = time.time(), time.perf_counter()
    device = runtime.init_distributed(config.ray.use_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    timings = {"process_group": time.perf_counter() - t0}
    if (created := process_started_at()) is not None:  # imports, and the launcher's own set-up
        timings["process_to_entry"] = started_at - created
    plan = plan_run(config, world, resolve_data=runtime.reads_shards)
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(config.training.seed)
    c = config.checkpoint
    snapshot_folder = runtime.snapshot_folder(c.memory_replicas) if c.enable and c.memory_interval > 0 else None
    if c.memory_interval > 0 and snapshot_folder is None and rank == 0:
        logger.warning("checkpoint.memory_interval = %d: %s", c.memory_interval,
                       "checkpoint.enable is off, so no memory snapshots are taken either" if not c.enable else
                       f"memory snapshots are kept by the Ray launcher's per-node stores; under {runtime.name} this "
                       "run takes disk checkpoints only")
    schedule = Schedule(config.training.steps, config.metrics.log_freq, c.interval, c.enable,
                        config.validation.freq if config.validation.enable else 0,
                        c.memory_interval if snapshot_folder else 0)
    storage.use_root(config.ray.storage_path)

    mesh = plan.dims.build_mesh(device.type)
    active = plan.dims.world_size
    active_group = dist.new_group(list(range(active))) if active < world else None
    # Async saves coordinate on a CPU group of their own, from a background thread.
    async_save = config.checkpoint.async_mode != "disabled"
    checkpoint_group = dist.new_group(list(range(active)), backend="gloo") if async_save else active_group
    snapshot_group = dist.new_group(list(range(active)), backend="gloo") if snapshot_folder else None
    max_world = runtime.max_world_size(world)  # the same on every rank
    control = new_control_group()  # the stop decision at every step, the grow decision at checkpoints
    growth = GrowthCheck(control, world, max_world, config.ray.resize_check_interval_s, runtime.spare_workers,
                         trained_by=lambda n: workers_that_train(config, n))
    stop = StopCheck(control, runtime.stop_requested, config.checkpoint.save_on_signal_timeout_s,
                     storage.join(config.run_dir, config.checkpoint.folder))
    return WorkerContext(config, runtime, device, rank, world, plan, mesh, schedule, growth, stop, checkpoint_group,
                         started_at, timings, active_group, snapshot_folder, snapshot_group)


def restore(ctx: WorkerContext, trainer: Trainer) -> int | None:
    """Resume from the newest committed step (or ``checkpoint.load_step``), else load the initial
    weights if any. Returns the step resumed from."""
    c = ctx.config.checkpoint
    checkpoint = trainer.checkpoint
    step = checkpoint.resolve_load_step(c.load_step) if c.enable else None
    if trainer.snapshots is not None and c.load_step < 0:
        resumed = restore_snapshot(trainer.snapshots, step)
        if resumed is not None:
            ctx.resumed_from = "memory"
            logger.info("resumed from the memory snapshot of step %d (%d tokens seen, data cursor %s)", resumed,
                        trainer.state.tokens_seen, trainer.loader.cursor.as_list())
            return resumed
    if step is not None:
        step = checkpoint.load(step)  # an older step when the newest fails its checksums
        ctx.resumed_from = "disk"
        logger.info("resumed from %s/step-%d (step %d, %d tokens seen, data cursor %s)", checkpoint.folder, step,
                    trainer.state.step, trainer.state.tokens_seen, trainer.loader.cursor.as_list())
    elif c.initial_load_path:
        imported = c.initial_load_in_hf or is_torch_file(c.initial_load_path)
        path = import_weights(ctx.config, ctx.checkpoint_group) if imported else c.initial_load_path
        checkpoint.load_path(path, model_only=c.initial_load_model_only)
        logger.info("initial %s from %s", "weights" if c.initial_load_model_only else "state", c.initial_load_path)
    return step


def restore_snapshot(snapshots, disk_step: int | None) -> int | None:
    """Load the newest complete memory snapshot if it is newer than ``disk_step``; returns its
    step, or None (with a warning saying what it costs when a newer snapshot is incomplete: both
    holders of some rank's part are gone). Every rank reads the same stores, so all agree."""
    committed = committed_steps(snapshots.folder)
    disk = -1 if disk_step is None else disk_step
    if not committed or committed[-1] <= disk:
        return None
    try:
        step = snapshots.resolve_load_step()  # skips incomplete snapshots, with a warning naming the missing file
        if step is not None and step > disk:
            return snapshots.load(step)
    except CheckpointError as e:
        if disk_step is None:
            raise CheckpointError(f"the memory snapshots cannot be loaded ({e}) and there is no disk checkpoint to "
                                  "fall back to") from e
        logger.warning("the memory snapshots cannot be loaded: %s", e)
    where = f"disk checkpoint step {disk_step}" if disk_step is not None else "the start"
    logger.warning("no complete memory snapshot newer than the disk checkpoints (the newest, step %d, lost a part "
                   "with both its holders): resuming from %s costs %d steps", committed[-1], where, committed[-1] - disk
                   if disk_step is not None else committed[-1])
    return None


def finished_step(ctx: WorkerContext) -> int | None:
    """The last step of a run whose final weights-only save exists (read from storage, so every
    rank, idle ones too, agrees without a collective)."""
    c = ctx.config.checkpoint
    if not c.enable or c.load_step >= 0:
        return None
    return final_export(ctx.checkpoint_folder, ctx.config.training.steps)


def run(config: JobConfig, runtime: Runtime) -> Trainer | TrainState:
    """Train this rank's share of the run. Returns the ``Trainer`` (its parts and final state)
    on a rank that trained, else the ``TrainState`` it stopped at."""
    ctx = start(config, runtime)
    try:
        outcome = train(ctx)
    except BaseException:
        ctx.stop.close(complete=False)  # the other ranks may never post their part of the stop check
        raise
    ctx.stop.close()
    return outcome


def refuse_retry(ctx: WorkerContext) -> None:
    """Raise again the non-finite stop of this launch, if its workers stopped on one.

    Ray restarts the worker group after any worker error (up to ray.max_failures); the same
    weights and data would only reach the same step again. Every rank reads the same marker, so
    all refuse together, before building anything. A new launch (another attempt id: the same
    command run again, after lowering optimizer.lr, say) trains again from the last good checkpoint."""
    if ctx.runtime.attempt is None:
        return
    path = storage.join(ctx.config.run_dir, NONFINITE_FILE)
    if not storage.isfile(path):
        return
    marker = json.loads(storage.read_text(path))
    if marker.get("attempt") == ctx.runtime.attempt:
        raise NonFiniteError(f"{marker['error']} (not retried: this launch stopped on it; {path})", marker["step"])


def record_nonfinite_stop(ctx: WorkerContext, error: NonFiniteError) -> None:
    """Rank 0 records the stop for ``refuse_retry``; every training rank waits for it, so the
    marker exists before any rank's error ends the group."""
    if ctx.runtime.attempt is None:  # torchrun: no launcher restarts the group
        return
    if ctx.rank == 0:
        storage.write_text(storage.join(ctx.config.run_dir, NONFINITE_FILE),
                           json.dumps({"attempt": ctx.runtime.attempt, "step": error.step, "error": str(error),
                                       "time": time.time()}))
    dist.barrier(group=ctx.active_group)


def train(ctx: WorkerContext) -> Trainer | TrainState:
    config, c = ctx.config, ctx.config.checkpoint
    refuse_retry(ctx)
    if (done := finished_step(ctx)) is not None:
        logger.info("the run is finished: %s/step-%d holds its final weights; raise training.steps to train on "
                    "(from the newest full checkpoint)", ctx.checkpoint_folder, done)
        return TrainState(step=done)
    if ctx.rank >= ctx.active:
        return idle(ctx)

    t0 = time.perf_counter()
    if ctx.snapshot_folder and c.load_step < 0:  # the newest snapshot streams in while the model is built
        stores, folder = storage.handler(ctx.snapshot_folder)
        stores.prefetch(folder, ctx.rank)
    trainer = build(ctx)
    ctx.timings["build"] = time.perf_counter() - t0
    if c.create_seed_checkpoint:
        if ctx.world != 1:
            raise ValueError("checkpoint.create_seed_checkpoint runs on one process: set ray.num_workers = 1")
        trainer.checkpoint.save(0, model_only=True, blocking=True)
        logger.info("seed checkpoint written to %s", trainer.checkpoint.folder)
        return trainer

    t0 = time.perf_counter()
    resumed_step = restore(ctx, trainer)
    if ctx.snapshot_folder and c.load_step < 0:
        storage.handler(ctx.snapshot_folder)[0].drop_prefetched()
    ctx.timings["checkpoint_load"] = time.perf_counter() - t0
    agree_on_first_step(trainer.state.step + 1)  # ranks that idle report in step with the others

    if ctx.rank == 0:
        storage.makedirs(config.run_dir)
        record_start(config.run_dir, ctx.checkpoint_folder, started_at=ctx.started_at, world=ctx.world,
                     active=ctx.active, dp=trainer.loader.dp_size, local_batch=ctx.plan.local_batch_size,
                     accumulation=ctx.plan.accumulation_steps, resumed_step=resumed_step,
                     target_steps=config.training.steps, timings=ctx.timings, attempt=ctx.runtime.attempt,
                     resumed_from=ctx.resumed_from)
        trainer.extra_metrics = restart_metrics(config.run_dir)
        # On an object store every write is an upload: the progress marker then follows the log steps.
        every_step = not storage.is_remote(config.run_dir)

        def mark_progress(step: int) -> None:
            if every_step or step % config.metrics.log_freq == 0 or ctx.schedule.reports(step):
                write_progress(config.run_dir, step)

        trainer.after_step = mark_progress
    if config.profiling.enable_profiling or config.profiling.enable_memory_snapshot:
        trainer.profiler = Profiler(config.profiling, config.local_dir, ctx.rank, ctx.device,
                                    first_step=trainer.state.step + 1)

    try:
        trainer.fit()
    except NonFiniteError as e:
        record_nonfinite_stop(ctx, e)
        newest = newest_readable_step(ctx.checkpoint_folder) if c.enable else None
        logger.error("stopped at step %d on a non-finite value; %s", e.step,
                     f"the newest committed checkpoint is {step_dir(ctx.checkpoint_folder, newest)}"
                     if newest is not None else "no checkpoint was committed")
        raise
    if ctx.growth.target and ctx.rank == 0:
        request_grow(config.run_dir, trainer.state.step, ctx.world, ctx.growth.target, attempt=ctx.runtime.attempt)
    if trainer.stopped and ctx.rank == 0:
        step = trainer.state.step
        write_progress(config.run_dir, step, stopped=trainer.stopped)
        saved = (f"checkpoint {step_dir(ctx.checkpoint_folder, step)} committed; run the same command to resume "
                 "from it" if c.enable else "checkpoint.enable is off: nothing was saved")
        logger.warning("stopped at step %d of %d on request (%s): %s", step, config.training.steps, trainer.stopped,
                       saved)
    return trainer


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv, prog="raytitan.worker")
    from raytitan.components.lease import hold_run_folder  # rank 0 holds the run folder (one writer per folder)

    try:
        with hold_run_folder(config.run_dir, config.ray.storage_path, enabled=os.environ.get("RANK", "0") == "0",
                             kind="torchrun rank 0"):
            outcome = run(config, TorchrunRuntime())
    except ConfigError as e:  # found by a rank's own planning (data, tokenizer): a message, as the driver gives
        if os.environ.get("RANK", "0") == "0":  # every rank finds it: one says it
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    state = outcome.state if isinstance(outcome, Trainer) else outcome
    # Under torchrun only a stop on request ends a run early (no growth without a launcher).
    stopped = state.step < config.training.steps and not config.checkpoint.create_seed_checkpoint
    if stopped:  # saved: the SIGTERM torchrun sends the other ranks once one exits changes nothing now
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_initialized():
        dist.destroy_process_group()
    if stopped:
        sys.exit(EXIT_STOPPED if config.checkpoint.enable else 1)
