"""torch.compile per transformer block (and of the loss): each block compiles once and is reused,
so compile time stays flat in depth. ``Module.compile`` compiles in place, keeping parameter
names (and so checkpoints) unchanged."""

from __future__ import annotations

import torch

from raytitan.components.loss import cross_entropy_sum

COMPONENTS = ("model", "loss")


def compile_blocks(model: torch.nn.Module) -> None:
    """``model``: a model (or pipeline stage) whose ``layers`` ModuleDict holds its blocks."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def build_loss(compile_loss: bool):
    """The summed cross entropy, compiled or not."""
    return torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum
