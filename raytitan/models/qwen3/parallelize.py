"""Qwen3's tensor-parallel plan and layout checks; the other parallelisms are the shared ones
(``raytitan.distributed.parallelize``)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from raytitan.distributed.parallelize import parallelize
from raytitan.models.llama3.parallelize import block_plan, top_level_plan
from raytitan.models.qwen3.model import Transformer


def parallelize_qwen3(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8, TP (with sequence and loss parallel), CP, activation checkpointing, compile, then
    FSDP/HSDP, per the JobConfig ``config``. A tied output head stays the embedding's Parameter
    throughout (FSDP manages the shared Parameter once)."""
    return parallelize(model, dims, mesh, config, tensor_parallel=apply_tensor_parallel)


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Llama's Megatron-style plan (vocab-parallel embedding and head, column- then row-wise
    linears, sequence-parallel norms) plus the QK-norms: each rank holds whole heads after the
    column-wise wq / wk, so a QK-norm's input is sharded along its heads dim (2) and its weight
    is replicated; the weight's gradient is summed over the tensor-parallel ranks.

    The embedding and the output head are both sharded by vocab row (Shard(0)), so a tied pair
    stays one Parameter: ``parallelize_module`` gives each module its own DTensor, and the head
    is tied back to the embedding's."""
    top = top_level_plan(model, loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
        model.tie_weights()
    plan = {**block_plan(),
            "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)}
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)


def check_layout(args, dims) -> None:
    """Heads must group evenly and rotate in pairs; tensor parallel splits attention by heads (the
    degree must divide both head counts); a tied head cannot sit on another pipeline stage than
    the embedding."""
    if args.n_heads % args.kv_heads:
        raise ValueError(f"model: n_heads {args.n_heads} is not divisible by n_kv_heads {args.kv_heads}")
    if args.head_dim % 2:
        raise ValueError(f"model: head_dim {args.head_dim} must be even (RoPE rotates pairs)")
    if dims.tp > 1:
        for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
            if n % dims.tp:
                raise ValueError(f"parallelism.tensor_parallel_degree {dims.tp} does not divide the model's {what} "
                                 f"({n}): pick a degree that divides both head counts")
    if dims.pp > 1 and args.tie_embeddings:
        raise ValueError(f"parallelism.pipeline_parallel_degree {dims.pp}: this flavor ties the output head to the "
                         "token embedding (one weight), which pipeline parallel would put on two stages; use an "
                         "untied flavor or pipeline_parallel_degree = 1")
