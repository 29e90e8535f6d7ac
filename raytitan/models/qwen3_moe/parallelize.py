"""Qwen3-MoE's layouts: data parallel (FSDP / HSDP), expert parallel, tensor parallel for the
attention (Qwen3's plan) with the MoE layers on each rank's own sequence shard, and pipeline
parallel, with activation checkpointing and compile, the shared steps of
``raytitan.distributed.parallelize`` (which splits the experts over
``parallelism.expert_parallel_degree`` ranks). No context parallel: the spec refuses it before
launch."""

from __future__ import annotations

import dataclasses

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import PrepareModuleInputOutput, SequenceParallel

from raytitan.distributed.parallelize import mark_sequence_local, parallelize
from raytitan.models.llama3.parallelize import apply_tensor_parallel as apply_llama_tensor_parallel
from raytitan.models.qwen3.parallelize import check_layout as check_qwen3_layout, qwen3_block_plan
from raytitan.models.qwen3_moe.model import Transformer

# Float8 converts nn.Linear layers; the router's gate must keep its precision (a float8 router
# would choose experts by rounded scores). The experts are not nn.Linear: never converted.
FLOAT8_KEEP = ("router.gate",)


def parallelize_qwen3_moe(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8 (attention projections only), tensor parallel, expert parallel, activation
    checkpointing, compile, FSDP/HSDP."""
    return parallelize(model, dims, mesh, dataclasses.replace(config, float8=float8_settings(config.float8)),
                       tensor_parallel=apply_tensor_parallel)


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Qwen3's plan for the embedding, attention, norms and output head; each MoE layer runs on
    its rank's own shard of the sequence (sequence parallel leaves the tokens split over the tp
    ranks; every token is routed, and its experts computed, on exactly one tp rank), with the
    router and experts whole on every tp rank, not split by tensor parallel (under expert parallel
    they are split by that alone). Their gradients are summed over the tp ranks by FSDP
    (``mark_sequence_local``), and the load-balancing counts over them by
    ``raytitan.models.moe.update_load_balance_bias`` (``MoE.token_group``), so routing, balancing
    and the updates are one process's."""
    plan = {k: v for k, v in qwen3_block_plan().items() if not k.startswith("feed_forward")}
    plan["ffn_norm"] = SequenceParallel()
    plan["moe"] = PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                           use_local_input=True, output_layouts=(Shard(1),),
                                           desired_output_layouts=(Shard(1),), use_local_output=True)
    apply_llama_tensor_parallel(model, tp_mesh, loss_parallel, block=plan)
    for block in model.layers.values():
        mark_sequence_local(block.moe)
        block.moe.token_group = tp_mesh.get_group()


def float8_settings(settings):
    """The run's Float8 settings with the routers kept out (a copy: the config is not changed)."""
    keep = [n for n in FLOAT8_KEEP if n not in settings.filter_fqns]
    return dataclasses.replace(settings, filter_fqns=[*settings.filter_fqns, *keep])


def check_layout(args, dims) -> None:
    """Qwen3's head and tensor-parallel checks (the planner checks the expert-parallel degree)."""
    check_qwen3_layout(args, dims)
