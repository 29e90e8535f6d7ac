"""Build a rank's training parts from the config: model parts, runner, optimizer, schedule,
data, validation, checkpoints, metrics, all handed to one ``Trainer``.

``build`` is the one place that knows how the parts fit together; ``raytitan.trainer.worker``
decides when to build, restore and train, and tests take the parts from the trainer it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings

import torch
import torch.distributed as dist

from raytitan.components import storage
from raytitan.components.checkpoint.convert import import_hf, import_torch
from raytitan.components.checkpoint.layout import COMMIT_MARKER, CheckpointError, read_commit_at
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState, OptimizerState
from raytitan.components.data.tokenizer import build_tokenizer
from raytitan.components.loss import build_loss
from raytitan.components.metrics import METRICS_FILE, MetricsLogger
from raytitan.components.optimizer import LRSchedulerState, build_lr_scheduler, build_optimizer
from raytitan.config.job import JobConfig
from raytitan.config.plan import check_aux_loss
from raytitan.distributed import float8
from raytitan.distributed.context import load_balanced_positions
from raytitan.distributed.dims import ParallelDims
from raytitan.distributed.pipeline import keep_stage, microbatches, num_stages, rank_stages, stage_layers
from raytitan.distributed.precision import DTYPES, param_dtype
from raytitan.models import get_spec
from raytitan.models.spec import build_meta, count_params
from raytitan.trainer.elastic.fault import FaultInjector
from raytitan.trainer.loop import NonFiniteGuard, Trainer, TrainState, Validator
from raytitan.trainer.runner import ModelRunner, PipelineLoss

logger = logging.getLogger("raytitan")


def build(ctx) -> Trainer:
    """This active rank's ``Trainer`` with every part built and nothing loaded yet (``ctx``: the
    ``WorkerContext`` that ``raytitan.trainer.worker.start`` returns)."""
    config, plan, mesh, device, runtime = ctx.config, ctx.plan, ctx.mesh, ctx.device, ctx.runtime
    dp_mesh, loss_mesh, pp_mesh = (ParallelDims.submesh(mesh, name) for name in ("dp", "dp_cp", "pp"))
    dp_rank, dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh else (0, 1)
    loss_group = loss_mesh.get_group() if loss_mesh else None  # ranks scoring different tokens
    pp_group = pp_mesh.get_group() if pp_mesh else None
    logger.info("%s | %s | global batch %d = local %d x accumulation %d x dp %d",
                runtime.name, plan.dims.summary, plan.global_batch_size, plan.local_batch_size,
                plan.accumulation_steps, dp_size)

    spec = get_spec(config.model.name)
    tokenizer = build_tokenizer(config.model)
    parts, stage_ids, stages = build_model_parts(plan, mesh, config, device)
    runner = build_runner(parts, stage_ids, stages, mesh, plan, config, device, tokenizer.bos_id)
    whole_model = build_meta(spec, plan.model_args)
    n_params, _ = count_params(whole_model)
    model_keys = set(whole_model.state_dict())
    logger.info("model %s %s: %.2fM parameters%s", config.model.name, config.model.flavor, n_params / 1e6,
                f" in {stages} pipeline stages" if stages > 1 else "")

    optimizer = build_optimizer(parts, config.optimizer, device)
    lr_scheduler = build_lr_scheduler(optimizer, config.lr_scheduler, config.training.steps)
    loader = runtime.build_loader("train", plan.shards, config.model, tokenizer, config.training.seq_len,
                                  config.training.seed, plan.global_batch_size, dp_rank, dp_size,
                                  config.training.shuffle_buffer, reader=ctx.rank, readers=ctx.active)
    validator = None
    if config.validation.enable:
        val_loader = runtime.build_loader("validation", plan.validation_shards, config.model, tokenizer,
                                          config.training.seq_len, config.training.seed,
                                          config.validation.local_batch_size * dp_size, dp_rank, dp_size, 0,
                                          reader=ctx.rank, readers=ctx.active)
        validator = Validator(runner, val_loader, config.validation.steps, loss_group, pp_group, device)

    fault = FaultInjector(config.fault, config.run_dir, ctx.rank, ctx.world, config.training.steps)
    state = TrainState()
    c = config.checkpoint
    checkpoint = CheckpointManager(
        ctx.checkpoint_folder,
        {"model": ModelState(parts), "optimizer": OptimizerState(parts, optimizer.optimizers),
         "lr_scheduler": LRSchedulerState(lr_scheduler), "dataloader": loader, "train_state": state},
        keep_latest_k=c.keep_latest_k, process_group=ctx.checkpoint_group,
        before_commit=fault.before_commit, async_mode=c.async_mode, exclude_from_loading=c.exclude_from_loading,
        model_keys=model_keys,
        commit_info={**model_facts(config, plan, tokenizer), "parallelism": parallel_degrees(plan.dims)},
        last_save_model_only=c.last_save_model_only, export_dtype=DTYPES[c.export_dtype],
        last_save_in_hf=c.last_save_in_hf,
    )
    snapshots = None
    if ctx.snapshot_folder:  # the same states, into host memory: see raytitan.ray.snapshots
        snapshots = CheckpointManager(
            ctx.snapshot_folder, checkpoint.states, keep_latest_k=1, process_group=ctx.snapshot_group,
            before_commit=fault.before_snapshot_commit, model_keys=model_keys, async_mode="async",
            # Packed into one reused (pinned, on CUDA) buffer, sent to the stores in the background.
            commit_info=checkpoint.commit_info, raw_bytes=True, failed_write_ends_run=False,
        )
    tb = os.path.join(config.local_dir, config.metrics.save_tb_folder) if config.metrics.enable_tensorboard else None
    metrics = MetricsLogger(device, spec.training_flops_per_token(plan.model_args, whole_model, config.training.seq_len),
                            ctx.active, config.metrics.peak_tflops, tb, ctx.rank,
                            jsonl_path=storage.join(config.run_dir, METRICS_FILE))
    wants_scales = float8.wanted(config.model.converters) and config.float8.precompute_float8_dynamic_scale_for_fsdp
    return Trainer(
        runner, optimizer, lr_scheduler, loader, checkpoint, metrics, state,
        device=device, local_batch_size=plan.local_batch_size, schedule=ctx.schedule,
        max_norm=config.training.max_norm, loss_group=loss_group, pp_group=pp_group, validator=validator,
        report=runtime.report, before_step=fault.before_step,
        after_optimizer_step=after_optimizer_step(spec, parts, loss_group, wants_scales),
        stop_at_boundary=ctx.growth, stop_requested=ctx.stop,
        guard=NonFiniteGuard(config.training.on_nonfinite, config.training.max_nonfinite_skips),
        group=ctx.active_group, snapshots=snapshots,
        model_metrics=(lambda: spec.metrics(parts)) if spec.metrics else (lambda: {}),
    )


def after_optimizer_step(spec, parts: list[torch.nn.Module], dp_group, float8_scales: bool):
    """What runs after each applied optimizer step: the family's own update (over the ranks that
    see different tokens, so every replica agrees), then the Float8 scales for the next all-gather."""
    hooks = []
    if spec.after_optimizer_step is not None:
        hooks.append(lambda: spec.after_optimizer_step(parts, dp_group))
    if float8_scales:
        hooks.append(lambda: float8.precompute_scales(parts))

    def run() -> None:
        for hook in hooks:
            hook()

    return run


def build_model_parts(plan, mesh, config: JobConfig, device: torch.device) -> tuple[list[torch.nn.Module], list[int], int]:
    """This rank's model parts: the whole model, or its pipeline stages. Each is built on the meta
    device, parallelized, materialized on ``device`` and initialized. Returns (parts, their stage
    indices, number of stages)."""
    args, p, spec = with_aux_loss(plan.model_args, plan.dims, config), config.parallelism, get_spec(config.model.name)
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
        model = build_meta(spec, args)
        if pp_mesh is not None:
            keep_stage(model, layers[stage], first=stage == 0, last=stage == stages - 1,
                       first_modules=spec.first_stage_modules, last_modules=spec.last_stage_modules)
        spec.parallelize(model, plan.dims, mesh, config)
        model.to_empty(device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            # On CPU, sharded random init differs from one-process init (DTensor's RNG is CUDA-only):
            # runs that must start identical across layouts load a seed checkpoint instead.
            warnings.filterwarnings("ignore", message="DTensor random operators")
            torch.manual_seed(config.training.seed + stage)
            model.init_weights(buffer_device=device)
        parts.append(model)
    return parts, stage_ids, stages


def build_runner(parts: list[torch.nn.Module], stage_ids: list[int], stages: int, mesh, plan, config: JobConfig,
                 device: torch.device, bos_id: int) -> ModelRunner:
    """How this rank runs a microbatch: directly, or through its pipeline schedule; with
    block-causal attention, documents start at ``bos_id``."""
    p = config.parallelism
    document_start = bos_id if config.model.attn_mask_type == "block_causal" else None
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
                           autocast_dtype=autocast, document_start=document_start)
    # Imported here: torch's pipelining loads torch._dynamo (raytitan.distributed.pipeline says why).
    from raytitan.distributed.pipeline_schedule import build_pipeline

    loss = PipelineLoss(loss_fn)

    def schedule(local_batch: int):
        return build_pipeline(parts, stage_ids, stages, pp_mesh.get_group(), device, p.pipeline_parallel_schedule,
                              microbatches(local_batch, p.pipeline_parallel_microbatch_size), loss)

    return ModelRunner(parts, cp_positions=cp_positions, loss_parallel=loss_parallel, loss_fn=loss_fn,
                       autocast_dtype=autocast, pipeline=schedule(plan.local_batch_size),
                       eval_pipeline=schedule(config.validation.local_batch_size) if config.validation.enable else None,
                       pipeline_loss=loss, is_last_stage=stages - 1 in stage_ids, document_start=document_start)


def with_aux_loss(args, dims: ParallelDims, config: JobConfig):
    """The model args with ``training.load_balance_loss_weight`` as the MoE layers' auxiliary loss
    weight, after the planner's check (``raytitan.config.plan.check_aux_loss``: an MoE model, no
    tensor, context or pipeline parallel), repeated here for callers that build without planning."""
    check_aux_loss(config, dims, args)
    weight = config.training.load_balance_loss_weight
    return dataclasses.replace(args, aux_loss_alpha=weight) if weight else args


def model_facts(config: JobConfig, plan, tokenizer) -> dict:
    """What a checkpoint records about its model, so exports need nothing else: the tokenizer is
    the one the run used ('byte' or 'hf', never 'auto'), with its folder only when it read one."""
    spec = get_spec(config.model.name)
    args = dataclasses.replace(plan.model_args, max_seq_len=spec.flavor(config.model.flavor).max_seq_len)
    return {"model": config.model.name, "flavor": config.model.flavor, "model_args": dataclasses.asdict(args),
            "tokenizer": tokenizer.name,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "hf_assets_path": tokenizer.folder}


def parallel_degrees(dims: ParallelDims) -> dict:
    """The degrees a checkpoint was saved under, for its commit marker: DCP loads it under any
    other, and the marker tells which (e.g. the expert-parallel degree before an elastic re-plan)."""
    return {name: getattr(dims, name) for name in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")}


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
