"""torch.compile per transformer block: each block compiles once and is reused, so compile time
stays flat in depth (the loss compiles in ``raytitan.components.loss``). ``Module.compile`` compiles in place, keeping parameter
names (and so checkpoints) unchanged."""

from __future__ import annotations

import torch

COMPONENTS = ("model", "loss")  # compile.components


def compile_blocks(model: torch.nn.Module) -> None:
    """``model``: a model (or pipeline stage) whose ``layers`` ModuleDict holds its blocks."""
    for block in model.layers.values():
        block.compile(fullgraph=True)
