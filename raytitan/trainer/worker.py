"""Per-worker entry: build mesh, model, optimizer, data and checkpoints, then train.

Runs unchanged under Ray (``raytitan.ray``) and under
``torchrun --nproc_per_node N -m raytitan.worker [--section.key value ...]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings

import torch
import torch.distributed as dist

from raytitan.components.checkpoint.layout import COMMIT_MARKER, CheckpointError, final_export, read_commit_at

from raytitan.components.checkpoint.manager import EXPORT_DTYPES, CheckpointManager, ModelState, OptimizerState
from raytitan.components import storage
from raytitan.components.checkpoint.convert import import_hf, import_torch
from raytitan.config.job import JobConfig, parse_args
from raytitan.components.data.tokenizer import build_tokenizer
from raytitan.components.metrics import METRICS_FILE, MetricsLogger
from raytitan.models.llama3.args import FLAVORS
from raytitan.models.llama3.model import Transformer, count_params, flops_per_token
from raytitan.models.llama3.parallelize import param_dtype, parallelize_llama
from raytitan.components.optimizer import build_lr_scheduler, build_optimizer
from raytitan.distributed import float8
from raytitan.distributed.compile import build_loss
from raytitan.distributed.context import load_balanced_positions
from raytitan.distributed.dims import ParallelDims
from raytitan.distributed.pipeline import (
    build_pipeline, keep_stage, microbatches, num_stages, rank_stages, stage_layers,
)
from raytitan.trainer.runner import ModelRunner, PipelineLoss
from raytitan.config.plan import plan_run
from raytitan.components.profiling import Profiler
from raytitan.trainer.runtime import Runtime, TorchrunRuntime, setup_logging
from raytitan.trainer.elastic.fault import FaultInjector
from raytitan.trainer.elastic.growth import GrowthCheck, new_control_group, request_grow
from raytitan.trainer.elastic.history import record_start, restart_metrics, write_progress
from raytitan.trainer.loop import Schedule, Trainer, TrainState, Validator

logger = logging.getLogger("raytitan")


class LRSchedulerState:
    """The schedule's position only: its shape is rebuilt from the config."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.last_epoch = int(state["last_epoch"])
        self.scheduler._step_count = self.scheduler.last_epoch + 1
        factors = [fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
        self.scheduler._last_lr = [base * f for base, f in zip(self.scheduler.base_lrs, factors)]
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler._last_lr):
            group["lr"] = lr


def build_model_parts(plan, mesh, config: JobConfig, device: torch.device) -> tuple[list[Transformer], list[int], int]:
    """This rank's model parts: the whole model, or its pipeline stages. Each is built on the meta
    device, parallelized, materialized on ``device`` and initialized. Returns (parts, their stage
    indices, number of stages)."""
    args, p = plan.model_args, config.parallelism
    pp_mesh = ParallelDims.submesh(mesh, "pp")
    if pp_mesh is None:
        stage_ids, stages, layers = [0], 1, [list(range(args.n_layers))]
    else:
        stages = num_stages(p, args.n_layers, plan.dims.pp)
        layers = stage_layers(args.n_layers, stages, p.pipeline_parallel_first_stage_less_layers,
                              p.pipeline_parallel_last_stage_less_layers)
        stage_ids = rank_stages(pp_mesh.get_local_rank(), plan.dims.pp, stages, p.pipeline_parallel_schedule)
    parts = []
    for stage in stage_ids:
        with torch.device("meta"):
            model = Transformer(args)
        if pp_mesh is not None:
            keep_stage(model, layers[stage], first=stage == 0, last=stage == stages - 1)
        parallelize_llama(model, plan.dims, mesh, config)
        model.to_empty(device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            # On CPU, sharded random init differs from one-process init (DTensor's RNG is CUDA-only):
            # runs that must start identical across layouts load a seed checkpoint instead.
            warnings.filterwarnings("ignore", message="DTensor random operators")
            torch.manual_seed(config.training.seed + stage)
            model.init_weights(buffer_device=device)
        parts.append(model)
    return parts, stage_ids, stages


def build_runner(parts: list[Transformer], stage_ids: list[int], stages: int, mesh, plan, config: JobConfig,
                 device: torch.device) -> ModelRunner:
    """How this rank runs a microbatch: directly, or through its pipeline schedule."""
    p = config.parallelism
    cp_mesh = ParallelDims.submesh(mesh, "cp")
    cp_positions = None if cp_mesh is None else load_balanced_positions(
        config.training.seq_len, cp_mesh.size(), cp_mesh.get_local_rank())
    loss_parallel = plan.dims.tp > 1 and not p.disable_loss_parallel
    loss_fn = build_loss(config.compile.enable and "loss" in config.compile.components)
    # FSDP casts parameters for compute; without it (one rank, TP only) autocast does.
    dtype = param_dtype(config.training.mixed_precision_param, device.type)
    autocast = dtype if ParallelDims.fsdp_mesh(mesh) is None and dtype != torch.float32 else None
    pp_mesh = ParallelDims.submesh(mesh, "pp")
    if pp_mesh is None:
        return ModelRunner(parts, cp_positions=cp_positions, loss_parallel=loss_parallel, loss_fn=loss_fn,
                           autocast_dtype=autocast)
    loss = PipelineLoss(loss_fn)

    def schedule(local_batch: int):
        return build_pipeline(parts, stage_ids, stages, pp_mesh.get_group(), device, p.pipeline_parallel_schedule,
                              microbatches(local_batch, p.pipeline_parallel_microbatch_size), loss)

    return ModelRunner(parts, cp_positions=cp_positions, loss_parallel=loss_parallel, loss_fn=loss_fn,
                       autocast_dtype=autocast, pipeline=schedule(plan.local_batch_size),
                       eval_pipeline=schedule(config.validation.local_batch_size) if config.validation.enable else None,
                       pipeline_loss=loss, is_last_stage=stages - 1 in stage_ids)


def run(config: JobConfig, runtime: Runtime) -> TrainState:
    started_at, t0 = time.time(), time.perf_counter()
    device = runtime.init_distributed(config.ray.use_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    timings = {"process_group": time.perf_counter() - t0}
    plan = plan_run(config, world, resolve_data=runtime.reads_shards)
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(config.training.seed)
    schedule = Schedule(config.training.steps, config.metrics.log_freq, config.checkpoint.interval,
                        config.checkpoint.enable, config.validation.freq if config.validation.enable else 0)
    storage.use_root(config.ray.storage_path)
    checkpoint_folder = storage.join(config.run_dir, config.checkpoint.folder)

    # Collective on every rank, also those that will idle.
    mesh = plan.dims.build_mesh(device.type)
    active = plan.dims.world_size
    active_group = dist.new_group(list(range(active))) if active < world else None
    # Async saves coordinate on a CPU group of their own, from a background thread.
    async_save = config.checkpoint.async_mode != "disabled"
    checkpoint_group = dist.new_group(list(range(active)), backend="gloo") if async_save else active_group
    max_world = runtime.max_world_size(world)  # the same on every rank
    growth = GrowthCheck(new_control_group() if max_world > world else None, world, max_world,
                         config.ray.resize_check_interval_s, runtime.spare_workers,
                         trained_by=lambda n: workers_that_train(config, n))
    if rank >= active:
        return idle(config, runtime, plan, schedule, growth)

    dp_mesh, loss_mesh, pp_mesh = (ParallelDims.submesh(mesh, name) for name in ("dp", "dp_cp", "pp"))
    dp_rank, dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh else (0, 1)
    loss_group = loss_mesh.get_group() if loss_mesh else None  # ranks scoring different tokens
    pp_group = pp_mesh.get_group() if pp_mesh else None
    logger.info("%s | %s | global batch %d = local %d x accumulation %d x dp %d",
                runtime.name, plan.dims.summary, plan.global_batch_size, plan.local_batch_size,
                plan.accumulation_steps, dp_size)

    t1 = time.perf_counter()
    parts, stage_ids, stages = build_model_parts(plan, mesh, config, device)
    runner = build_runner(parts, stage_ids, stages, mesh, plan, config, device)
    with torch.device("meta"):
        whole_model = Transformer(plan.model_args)
        n_params, n_embedding = count_params(whole_model)
        model_keys = set(whole_model.state_dict())
    logger.info("model %s %s: %.2fM parameters%s", config.model.name, config.model.flavor, n_params / 1e6,
                f" in {stages} pipeline stages" if stages > 1 else "")

    optimizer = build_optimizer(parts, config.optimizer, device)
    lr_scheduler = build_lr_scheduler(optimizer, config.lr_scheduler, config.training.steps)
    tokenizer = build_tokenizer(config.model)
    loader = runtime.build_loader("train", plan.shards, config.model, tokenizer, config.training.seq_len,
                                  config.training.seed, plan.global_batch_size, dp_rank, dp_size,
                                  config.training.shuffle_buffer, reader=rank, readers=active)
    validator = None
    if config.validation.enable:
        val_loader = runtime.build_loader("validation", plan.validation_shards, config.model, tokenizer,
                                          config.training.seq_len, config.training.seed,
                                          config.validation.local_batch_size * dp_size, dp_rank, dp_size, 0,
                                          reader=rank, readers=active)
        validator = Validator(runner, val_loader, config.validation.steps, loss_group, pp_group, device)
    timings["build"] = time.perf_counter() - t1

    fault = FaultInjector(config.fault, config.run_dir, rank, world, config.training.steps)
    state = TrainState()
    c = config.checkpoint
    checkpoint = CheckpointManager(
        checkpoint_folder,
        {"model": ModelState(parts), "optimizer": OptimizerState(parts, optimizer.optimizers),
         "lr_scheduler": LRSchedulerState(lr_scheduler), "dataloader": loader, "train_state": state},
        interval=c.interval, keep_latest_k=c.keep_latest_k, enable=c.enable, process_group=checkpoint_group,
        before_commit=fault.before_commit, async_mode=c.async_mode, exclude_from_loading=c.exclude_from_loading,
        model_keys=model_keys, commit_info=model_facts(config, plan, tokenizer),
        last_save_model_only=c.last_save_model_only, export_dtype=EXPORT_DTYPES[c.export_dtype],
        last_save_in_hf=c.last_save_in_hf,
    )
    if c.create_seed_checkpoint:
        if world != 1:
            raise ValueError("checkpoint.create_seed_checkpoint runs on one process: set ray.num_workers = 1")
        checkpoint.save(0, model_only=True, blocking=True)
        logger.info("seed checkpoint written to %s", checkpoint.folder)
        return state

    if c.enable and c.load_step < 0 and (done := final_export(checkpoint.folder, config.training.steps)) is not None:
        logger.info("the run is finished: %s/step-%d holds its final weights; raise training.steps to train on "
                    "(from the newest full checkpoint)", checkpoint.folder, done)
        return state

    t2 = time.perf_counter()
    step = checkpoint.resolve_load_step(c.load_step) if c.enable else None
    if step is not None:
        checkpoint.load(step)
        logger.info("resumed from %s/step-%d (step %d, %d tokens seen, data cursor %s)",
                    checkpoint.folder, step, state.step, state.tokens_seen, loader.cursor.as_list())
    elif c.initial_load_path:
        path = import_weights(config, checkpoint_group) if c.initial_load_in_hf or is_torch_file(c.initial_load_path) \
            else c.initial_load_path
        checkpoint.load_path(path, model_only=c.initial_load_model_only)
        logger.info("initial %s from %s", "weights" if c.initial_load_model_only else "state", c.initial_load_path)
    timings["checkpoint_load"] = time.perf_counter() - t2
    agree_on_first_step(state.step + 1)  # ranks that idle report in step with the others

    extra_metrics = {}
    if rank == 0:
        storage.makedirs(config.run_dir)
        record_start(config.run_dir, checkpoint_folder, started_at=started_at, world=world, active=active, dp=dp_size,
                     local_batch=plan.local_batch_size, accumulation=plan.accumulation_steps, resumed_step=step,
                     target_steps=config.training.steps, timings=timings)
        extra_metrics = restart_metrics(config.run_dir)

    tb = os.path.join(config.local_dir, config.metrics.save_tb_folder) if config.metrics.enable_tensorboard else None
    profiler = None
    if config.profiling.enable_profiling or config.profiling.enable_memory_snapshot:
        profiler = Profiler(config.profiling, config.local_dir, rank, device, first_step=state.step + 1)
    # On an object store every write is an upload: the progress marker then follows the log steps.
    progress_every_step = not storage.is_remote(config.run_dir)

    def after_step(step: int) -> None:
        if rank == 0 and (progress_every_step or step % config.metrics.log_freq == 0 or schedule.reports(step)):
            write_progress(config.run_dir, step)
        if profiler is not None:
            profiler.step(step)

    precompute_float8 = float8.wanted(config.model.converters) and config.float8.precompute_float8_dynamic_scale_for_fsdp
    metrics = MetricsLogger(device, flops_per_token(plan.model_args, n_params, n_embedding, config.training.seq_len),
                            active, config.metrics.peak_tflops, tb, rank,
                            jsonl_path=storage.join(config.run_dir, METRICS_FILE))
    trainer = Trainer(
        runner, optimizer, lr_scheduler, loader, checkpoint, metrics, state,
        device=device, local_batch_size=plan.local_batch_size, schedule=schedule,
        max_norm=config.training.max_norm, loss_group=loss_group, pp_group=pp_group, validator=validator, report=runtime.report,
        before_step=fault.before_step,
        after_step=after_step,
        after_optimizer_step=(lambda: float8.precompute_scales(parts)) if precompute_float8 else (lambda: None),
        stop_at_boundary=growth,
        extra_metrics=extra_metrics,
    )
    state = trainer.fit()
    if profiler is not None:
        profiler.close()
    if growth.target and rank == 0:
        request_grow(config.run_dir, state.step, world, growth.target)
    return state


def model_facts(config: JobConfig, plan, tokenizer) -> dict:
    """What a checkpoint records about its model, so exports need nothing else."""
    args = dataclasses.replace(plan.model_args, max_seq_len=FLAVORS[config.model.flavor].max_seq_len)
    return {"flavor": config.model.flavor, "model_args": dataclasses.asdict(args), "tokenizer": config.model.tokenizer,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "hf_assets_path": config.model.hf_assets_path}


def is_torch_file(path: str) -> bool:
    return path.endswith((".pt", ".pth")) and os.path.isfile(path)


def import_weights(config: JobConfig, group) -> str:
    """``checkpoint.initial_load_path`` (a Hugging Face folder or a torch.save file of weights) as
    a DCP step folder every rank can load its shards from: converted once by rank 0 into the run
    folder, reused on restarts."""
    source = os.path.abspath(config.checkpoint.initial_load_path)
    hf = config.checkpoint.initial_load_in_hf
    target = os.path.join(config.run_dir, "hf_import" if hf else "torch_import")
    error = None
    if dist.get_rank() == 0:
        try:
            if not (os.path.isfile(os.path.join(target, COMMIT_MARKER)) and read_commit_at(target).get("source") == source):
                t0 = time.perf_counter()
                (import_hf if hf else import_torch)(source, target)
                logger.info("converted %s weights %s to %s in %.1fs", "Hugging Face" if hf else "torch.save",
                            source, target, time.perf_counter() - t0)
        except Exception as e:  # every rank must learn of it, not wait forever
            error = f"{type(e).__name__}: {e}"
    shared = [error]
    dist.broadcast_object_list(shared, src=0, group=group)
    if shared[0]:
        raise CheckpointError(f"cannot import weights from {source}: {shared[0]}")
    return target


def workers_that_train(config: JobConfig, world: int) -> int:
    """How many of ``world`` workers the layout would use (0: it cannot be formed)."""
    try:
        return plan_run(config, world, resolve_data=False).dims.world_size
    except ValueError:
        return 0


def agree_on_first_step(first: int) -> int:
    """Rank 0's first step, on every rank of the world (the ones that idle included)."""
    shared = [first]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def idle(config: JobConfig, runtime: Runtime, plan, schedule: Schedule, growth: GrowthCheck) -> TrainState:
    """A rank outside the layout: holds no state, and makes the same ``report`` calls and grow
    checks as the others (Ray requires every worker to report equally often) until the run ends
    or the group resizes."""
    logger.warning(
        "rank %d idles: %d workers keep the global batch of %d only as %s; it rejoins at the next resize",
        dist.get_rank(), plan.world_size, plan.global_batch_size, plan.dims.summary,
    )
    first = agree_on_first_step(0)
    for step in range(first, config.training.steps + 1):
        if schedule.reports(step):
            runtime.report({"step": step, "idle": 1}, None)
        if schedule.boundary(step) and growth(step):
            return TrainState(step=step)
    return TrainState(step=config.training.steps)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv, prog="raytitan.worker")
    run(config, TorchrunRuntime())
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
