"""Activation checkpointing: trade compute for memory by recomputing block activations in backward.

- ``full``: every transformer block keeps only its input; everything inside is recomputed.
- ``selective`` with ``op``: per-op policy: outputs of matmuls and attention (expensive to
  recompute) and Float8's scalar amax are kept, the cheap ops between them (norms, activations,
  RoPE) are recomputed.
- ``selective`` with an integer N: every Nth block (by layer id) is checkpointed fully.

Blocks are wrapped in place in ``model.layers``; state-dict keys are unchanged (the wrapper
strips its own prefix), so checkpoints move freely between runs with and without it.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import raytitan.distributed.context  # noqa: F401  registers raytitan::ring_attention

aten = torch.ops.aten
# Outputs kept by the per-op policy: the FLOP-heavy ops of a block, plus whole-tensor max: Float8's
# tensorwise amax (max(abs(x))) is a full pass over an activation but its result is one scalar.
# The underscored ATen ops are torch's internal kernels (what F.scaled_dot_product_attention and
# float8 matmuls dispatch to); tests/test_private_apis.py checks they exist. ``checkpoint_wrapper``
# above is the other private name here (torch.distributed.algorithms._checkpoint, as torchtitan
# uses it: the wrapper that keeps state-dict keys unchanged); the same test checks that.
SAVED_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_mm.default,  # Float8 matmuls on hardware that has them
    aten.max.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.raytitan.ring_attention.default,  # context parallel: keeping it also spares the ring's K/V exchange
}
MODES = ("none", "full", "selective")


class ActivationCheckpointError(ValueError):
    """An activation_checkpoint setting that does not name a policy."""


def check_option(mode: str, option: str | int) -> None:
    option = str(option)
    if mode not in MODES:
        raise ActivationCheckpointError(f"activation_checkpoint.mode = {mode!r} is not one of {', '.join(MODES)}")
    if mode == "selective" and option != "op" and not (option.isdigit() and int(option) > 0):
        raise ActivationCheckpointError(
            f"activation_checkpoint.selective_ac_option = {option!r}: use 'op' or a positive integer N (every Nth block)")


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, option: str | int = "op") -> None:
    """Wrap the blocks of ``model`` (a model or pipeline stage whose ``layers`` ModuleDict holds them)."""
    check_option(mode, option)
    option = str(option)
    if mode == "none":
        return
    per_op = mode == "selective" and option == "op"
    every = int(option) if mode == "selective" and not per_op else 1
    for layer_id, block in list(model.layers.items()):
        if (int(layer_id) + 1) % every:
            continue
        kwargs = {"preserve_rng_state": False}  # the blocks draw no random numbers
        if per_op:
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)
        model.layers[layer_id] = checkpoint_wrapper(block, **kwargs)
