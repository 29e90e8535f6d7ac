"""Apply parallelism to a Llama 3 model in a fixed order: (TP, CP, AC, compile), then FSDP."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raytitan.models.llama3.model import Transformer
from raytitan.parallel.dims import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def param_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def parallelize_llama(model: Transformer, dims: ParallelDims, mesh: DeviceMesh, training) -> Transformer:
    """Shard ``model`` (still on meta) over ``mesh``. Later parallelisms slot in before FSDP."""
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        raise NotImplementedError("tensor, pipeline and context parallel are not available yet")
    fsdp_mesh = ParallelDims.fsdp_mesh(mesh)
    if fsdp_mesh is not None:
        apply_fsdp(model, fsdp_mesh, param_dtype(training.mixed_precision_param, mesh.device_type),
                   DTYPES[training.mixed_precision_reduce])
    return model


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param: torch.dtype, reduce: torch.dtype) -> None:
    """FSDP2 per transformer block and at the root; HSDP when the mesh is 2-D.

    The gradient divide factor is 1: the loss is already divided by the global token
    count, so gradients are summed over data-parallel ranks, not averaged.
    """
    policy = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's params are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in [*blocks, model]:
        module.set_gradient_divide_factor(1.0)
        # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling.
        module.set_force_sum_reduction_for_comms(True)
