"""Apply the parallelisms to a model (or one pipeline stage of it) on the meta device, in the
order that composes: Float8 conversion, tensor parallel, context parallel, expert parallel,
activation checkpointing, compile, then FSDP/HSDP. Families give their tensor-parallel plan; the rest works
on any model whose blocks sit in ``model.layers``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from raytitan.distributed import float8
from raytitan.distributed.activation_checkpoint import apply_activation_checkpointing
from raytitan.distributed.compile import compile_blocks
from raytitan.distributed.context import apply_context_parallel
from raytitan.distributed.dims import ParallelDims
from raytitan.distributed.expert_parallel import apply_expert_parallel, expert_modules
from raytitan.distributed.precision import DTYPES, param_dtype, reshard_after_forward

# (model, tp_mesh, loss_parallel) -> None: a family's tensor-parallel plan, applied in place.
TensorParallelPlan = Callable[[nn.Module, DeviceMesh, bool], None]


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, config,
                tensor_parallel: TensorParallelPlan | None = None) -> nn.Module:
    """Convert and shard ``model`` (per the JobConfig ``config``) over ``mesh``."""
    training, parallelism = config.training, config.parallelism
    if float8.wanted(config.model.converters):
        float8.convert_to_float8(model, config.float8, mesh.device_type)
    tp_mesh = ParallelDims.submesh(mesh, "tp")
    if tp_mesh is not None:
        if tensor_parallel is None:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan")
        tensor_parallel(model, tp_mesh, not parallelism.disable_loss_parallel)
        if parallelism.enable_async_tensor_parallel:
            enable_async_tensor_parallel(tp_mesh)
    cp_mesh = ParallelDims.submesh(mesh, "cp")
    if cp_mesh is not None:
        apply_context_parallel(model, cp_mesh.get_group(), training.seq_len, parallelism.context_parallel_rotate_method)
    ep_mesh = ParallelDims.submesh(mesh, "ep")
    if ep_mesh is not None:
        # Under tensor parallel the experts are whole on the tp ranks (each computes its own
        # sequence shard's tokens): DTensors over ('ep', 'tp'), replicated on tp.
        if tp_mesh is not None:
            ep_mesh = mesh["ep", "tp"]
        # A pipeline stage may hold no MoE layer (DeepSeek-V3's first, dense, layers): the whole
        # model has experts (the planner checks), this stage has none to split.
        apply_expert_parallel(model, ep_mesh, stage=dims.pp > 1)
    pp_mesh = ParallelDims.submesh(mesh, "pp")
    if pp_mesh is not None:
        # Where the other stages are, for what must see every layer: the MoE expert-load metrics
        # (raytitan.models.moe.moe_metrics) gather them over it. Not a module: no state, no hooks.
        model.pipeline_group = pp_mesh.get_group()
    ac = config.activation_checkpoint
    apply_activation_checkpointing(model, ac.mode, ac.selective_ac_option)
    if config.compile.enable and "model" in config.compile.components:
        compile_blocks(model, eager=expert_modules(model) if ep_mesh is not None else None)
    fsdp_mesh = ParallelDims.fsdp_mesh(mesh)
    local_mesh = ParallelDims.sequence_local_mesh(mesh) if sequence_local_modules(model) else None
    if fsdp_mesh is not None or local_mesh is not None:
        apply_fsdp(model, fsdp_mesh, param_dtype(training.mixed_precision_param, mesh.device_type),
                   DTYPES[training.mixed_precision_reduce],
                   reshard_after_forward(parallelism.fsdp_reshard_after_forward, dims.pp),
                   expert_mesh=ParallelDims.expert_fsdp_mesh(mesh), local_mesh=local_mesh)
    return model


# The attribute a tensor-parallel plan sets on a module that runs on each tp rank's own sequence
# shard (not split by tensor parallel): ``mark_sequence_local``.
SEQUENCE_LOCAL = "runs_on_sequence_shard"


def mark_sequence_local(module: nn.Module) -> None:
    """Declare, in a family's tensor-parallel plan, that ``module`` takes each tensor-parallel
    rank's own shard of the sequence (a local tensor, under sequence parallel) and computes on
    it with its parameters whole on every tp rank, not split by tensor parallel: an MoE layer,
    whose router and experts see each token on exactly one tp rank. Its parameters' gradients are
    then partial sums over the tp ranks; FSDP shards them over the data-parallel shard ranks and the
    tp ranks together (``ParallelDims.sequence_local_meshes``), so the reduce-scatter adds the tp
    ranks' parts too. Needs FSDP of it even without data parallel (then over the tp ranks alone)."""
    setattr(module, SEQUENCE_LOCAL, True)


def sequence_local_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, SEQUENCE_LOCAL, False)]


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Let the compiler split TP's all-gather / reduce-scatter into pieces that overlap the
    matmuls around them (CUDA symmetric memory; the blocks must be compiled).

    torch has only private switches for it (torch 2.13, as torchtitan uses them), all here and
    checked by tests/test_private_apis.py: inductor's ``_micro_pipeline_tp`` and
    ``torch.distributed._symmetric_memory.enable_symm_mem_for_group``. The latter says it is
    deprecated and no longer needed, yet inductor's micro-pipeline pass still skips every group
    it was not called for, so it is called (its warning silenced)."""
    import warnings

    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`enable_symm_mem_for_group` is deprecated", category=FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None, param: torch.dtype, reduce: torch.dtype,
               reshard_after_forward: bool = True, expert_mesh: DeviceMesh | None = None,
               local_mesh: DeviceMesh | None = None) -> None:
    """FSDP2 per block and at the root; HSDP when the mesh is 2-D.

    Under expert parallel (``expert_mesh``: the ranks that hold the same experts) each layer's
    experts are FSDP-sharded over ``expert_mesh`` first, on their hidden dimension (dim 1: the
    expert dim 0 is split by expert parallel already and may be smaller than the mesh), so the
    block's FSDP over all data-parallel ranks leaves them out.

    Under tensor parallel (``local_mesh``, from ``ParallelDims.sequence_local_mesh``) the
    modules marked by ``mark_sequence_local`` are FSDP-sharded over the data-parallel shard and
    tp ranks together, before the block (their experts, under expert parallel, over
    ``expert_mesh`` as above: their gradients come summed over the tp ranks from the experts'
    DTensors, ``raytitan.distributed.expert_parallel``). ``mesh`` None (no data parallel): only
    they are sharded.

    The gradient divide factor is 1: the loss is already divided by the global token
    count, so gradients are summed over data-parallel ranks, not averaged.
    """
    policy = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    blocks = list(model.layers.values())
    inner = []  # FSDP units inside the blocks
    for i, block in enumerate(blocks):
        # The last block's params are needed again first in backward: keep them gathered.
        keep = reshard_after_forward and i < len(blocks) - 1
        if expert_mesh is not None:
            for module in expert_modules(block):
                fully_shard(module, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=keep,
                            shard_placement_fn=lambda _: Shard(1))
                inner.append(module)
        for module in sequence_local_modules(block) if local_mesh is not None else []:
            fully_shard(module, mesh=local_mesh, mp_policy=policy, reshard_after_forward=keep)
            inner.append(module)
        if mesh is not None:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=keep)
    if mesh is None:
        wrapped = inner
    else:
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        wrapped = [*inner, *blocks, model]
    for module in wrapped:
        module.set_gradient_divide_factor(1.0)
        # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling.
        module.set_force_sum_reduction_for_comms(True)
