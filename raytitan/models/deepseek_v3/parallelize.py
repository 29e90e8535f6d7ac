"""DeepSeek-V3's layouts: data parallel (FSDP / HSDP) and pipeline parallel, with activation
checkpointing and compile, the shared steps of ``raytitan.distributed.parallelize`` (which also
apply expert parallel to the MoE layers' experts, generically; a stage of dense layers only has
none to split). No tensor parallel (latent attention has no plan yet) and no context parallel:
the spec refuses them before launch."""

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
    """Nothing beyond the shared checks (the spec refuses tensor and context parallel)."""
