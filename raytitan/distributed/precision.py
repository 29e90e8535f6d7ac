"""Dtypes by config name, and the FSDP policy keys: mixed precision and resharding after forward.

The one table of dtype names: training precision, checkpoint exports and conversions read it.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_DTYPES = ("auto", "bfloat16", "float32")  # training.mixed_precision_param
REDUCE_DTYPES = ("float32", "bfloat16")  # training.mixed_precision_reduce
RESHARD_AFTER_FORWARD = ("default", "always", "never")  # parallelism.fsdp_reshard_after_forward


def param_dtype(name: str, device_type: str) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on CPU (gloo and CPU kernels gain nothing from bf16)."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def reshard_after_forward(name: str, pp: int) -> bool:
    """``default`` keeps the gathered weights of pipelined models for their backward (each
    microbatch would gather them again), and frees them otherwise."""
    return {"always": True, "never": False, "default": pp == 1}[name.lower()]
