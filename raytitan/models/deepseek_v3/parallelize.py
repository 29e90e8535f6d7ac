"""DeepSeek-V3's layouts: data parallel (FSDP / HSDP), expert parallel, tensor parallel (the latent
attention split by heads, the latent projections and the MoE layers on each rank's own sequence
shard) and pipeline parallel, with activation checkpointing and compile, the shared steps of
``raytitan.distributed.parallelize`` (which also apply expert parallel to the MoE layers' experts,
generically; a stage of dense layers only has none to split). No context parallel: the spec
refuses it before launch."""

from __future__ import annotations

import dataclasses

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from raytitan.distributed.parallelize import mark_sequence_local, parallelize
from raytitan.models.deepseek_v3.model import Transformer
from raytitan.models.llama3.parallelize import block_plan, top_level_plan
from raytitan.models.qwen3_moe.parallelize import float8_settings
from raytitan.models.tied import tie_weights


def parallelize_deepseek_v3(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8 (attention and dense projections; routers kept out), tensor parallel, expert
    parallel, activation checkpointing, compile, FSDP/HSDP."""
    return parallelize(model, dims, mesh, dataclasses.replace(config, float8=float8_settings(config.float8)),
                       tensor_parallel=apply_tensor_parallel)


def attention_plan(q_lora_rank: int) -> dict:
    """The latent attention split by heads: the up projections ``wq_b`` / ``wkv_b`` (or ``wq``)
    column-wise, each taking its input as this rank's sequence shard and gathering it (the
    backward reduce-scatters), ``wo`` row-wise back to the sequence shard. The attention's input
    stays the sequence shard: the down projections ``wq_a`` / ``wkv_a`` and the latent norms run
    on it (``apply_tensor_parallel`` marks them sequence-local)."""
    up = ["wkv_b", "wq"] if q_lora_rank == 0 else ["wkv_b", "wq_b"]
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Shard(1), None),
                                        use_local_output=True),
        **{f"attention.{name}": ColwiseParallel(input_layouts=Shard(1)) for name in up},
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }


def moe_plan() -> dict:
    """Qwen3-MoE's: the MoE layer takes and returns this rank's sequence shard as a local tensor."""
    return {"ffn_norm": SequenceParallel(),
            "moe": PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                            use_local_input=True, output_layouts=(Shard(1),),
                                            desired_output_layouts=(Shard(1),), use_local_output=True)}


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Llama's plan for the embedding, final norm and output head, and for the dense blocks'
    feed-forward; Qwen3-MoE's for the MoE layers (each on its rank's sequence shard, routing and
    balancing as one process's: ``MoE.token_group``); the attention by ``attention_plan``.

    The down projections and latent norms (small, not split by heads) have their weights whole on
    every tp rank and see each token on exactly one: their gradients are partial sums over the tp
    ranks, summed by FSDP (``mark_sequence_local``). The shared RoPE key comes out of ``wkv_a`` on
    the sequence shard; RoPE and every head need the whole sequence, so it is all-gathered
    (``rope_key``), and its gradient, from this rank's heads only, reduce-scattered."""
    top = top_level_plan(model, loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
        tie_weights(model)
    for block in model.layers.values():
        attention = block.attention
        plan = attention_plan(attention.q_lora_rank)
        if block.moe is None:
            plan.update({k: v for k, v in block_plan().items() if k.startswith(("ffn_norm", "feed_forward"))})
        else:
            plan.update(moe_plan())
            mark_sequence_local(block.moe)
            block.moe.token_group = tp_mesh.get_group()
        parallelize_module(block, tp_mesh, plan)
        latent = [attention.wkv_a, attention.kv_norm]
        latent += [] if attention.q_lora_rank == 0 else [attention.wq_a, attention.q_norm]
        for module in latent:
            mark_sequence_local(module)
        attention.rope_key.register_forward_hook(lambda _m, _i, out: gather_sequence(out, tp_mesh))


def gather_sequence(shard, tp_mesh: DeviceMesh):
    """All-gather this rank's sequence shard (dim 1) into the whole sequence; the gradient that
    comes back is this rank's part of the sum (``Partial``), so the backward reduce-scatters it."""
    whole = DTensor.from_local(shard, tp_mesh, (Shard(1),), run_check=False).redistribute(tp_mesh, (Replicate(),))
    return whole.to_local(grad_placements=(Partial(),))


def check_layout(args, dims) -> None:
    """Tensor parallel splits the attention by heads: its degree must divide n_heads (the planner
    checks that it divides the sequence length, and the expert-parallel degree)."""
    if dims.tp > 1 and args.n_heads % dims.tp:
        raise ValueError(f"parallelism.tensor_parallel_degree {dims.tp} does not divide the model's n_heads "
                         f"({args.n_heads}): pick a degree that divides it")
