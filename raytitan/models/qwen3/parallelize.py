"""Qwen3's tensor-parallel plan and layout checks; the other parallelisms are the shared ones
(``raytitan.distributed.parallelize``)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import SequenceParallel

from raytitan.distributed.parallelize import parallelize
from raytitan.models.llama3.parallelize import apply_tensor_parallel as apply_llama_tensor_parallel, block_plan, check_heads
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

    The embedding and a tied head stay one Parameter as in Llama's plan."""
    apply_llama_tensor_parallel(model, tp_mesh, loss_parallel, block=qwen3_block_plan())


def qwen3_block_plan() -> dict:
    """Llama's block plan with the QK-norms (Qwen3-MoE replaces its feed-forward entries)."""
    return {**block_plan(),
            "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)}


def check_layout(args, dims) -> None:
    """head_dim (Qwen3's own, not dim / n_heads) must be even for RoPE's pairs; then Llama's
    head, tensor-parallel and tied-pipeline checks."""
    if args.head_dim % 2:
        raise ValueError(f"model: head_dim {args.head_dim} must be even (RoPE rotates pairs)")
    check_heads(args, dims)
