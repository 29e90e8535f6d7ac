"""Qwen3-MoE's layouts: data parallel (FSDP / HSDP) and expert parallel, with activation
checkpointing and compile, the shared steps of ``raytitan.distributed.parallelize`` (which
splits the experts over ``parallelism.expert_parallel_degree`` ranks). No tensor, context or
pipeline parallel yet: the spec and ``check_layout`` refuse them before launch."""

from __future__ import annotations

import dataclasses

from torch.distributed.device_mesh import DeviceMesh

from raytitan.distributed.parallelize import parallelize
from raytitan.models.qwen3.parallelize import check_layout as check_qwen3_layout
from raytitan.models.qwen3_moe.model import Transformer

# Float8 converts nn.Linear layers; the router's gate must keep its precision (a float8 router
# would choose experts by rounded scores). The experts are not nn.Linear: never converted.
FLOAT8_KEEP = ("router.gate",)


def parallelize_qwen3_moe(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8 (attention projections only), expert parallel, activation checkpointing, compile,
    FSDP/HSDP."""
    return parallelize(model, dims, mesh, dataclasses.replace(config, float8=float8_settings(config.float8)))


def float8_settings(settings):
    """The run's Float8 settings with the routers kept out (a copy: the config is not changed)."""
    keep = [n for n in FLOAT8_KEEP if n not in settings.filter_fqns]
    return dataclasses.replace(settings, filter_fqns=[*settings.filter_fqns, *keep])


def check_layout(args, dims) -> None:
    """Data and expert parallel only for now (the planner checks the expert-parallel degree);
    then Qwen3's head checks."""
    if dims.pp > 1:
        raise ValueError("model.name = 'qwen3_moe' does not support pipeline parallel yet (data parallel only: "
                         "FSDP/HSDP): set parallelism.pipeline_parallel_degree = 1")
    check_qwen3_layout(args, dims)
