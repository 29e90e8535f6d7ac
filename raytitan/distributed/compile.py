"""torch.compile per transformer block: each block compiles once and is reused, so compile time
stays flat in depth (the loss compiles in ``raytitan.components.loss``). ``Module.compile`` compiles in place, keeping parameter
names (and so checkpoints) unchanged.

Under expert parallel a block cannot compile as one graph: the token all-to-all needs its split
sizes as Python integers (a host sync, data-dependent) and runs in forward hooks around the
experts. There the experts and the modules that hold them (the MoE layer's routing and
combination around the all-to-all) stay eager, and every other part of the block compiles on
its own: attention, the router, shared experts (a block's own norms, torch modules, stay eager)."""

from __future__ import annotations

import torch
from torch import nn

COMPONENTS = ("model", "loss")  # compile.components


def compile_blocks(model: torch.nn.Module, eager: list[nn.Module] | None = None) -> None:
    """``model``: a model (or pipeline stage) whose ``layers`` ModuleDict holds its blocks.
    ``eager``: modules that must not be compiled (expert-parallel experts); a block holding one
    compiles around them (``compile_around``)."""
    keep = {id(m) for m in eager or ()}
    for block in model.layers.values():
        if keep and _holds(block, keep):
            compile_around(block, keep)
        else:
            block.compile(fullgraph=True)


def compile_around(module: nn.Module, eager: set[int]) -> None:
    """Compile each child of ``module`` that holds none of the ``eager`` modules (by id), one graph
    each, and recurse into those that do; the ``eager`` modules and the forwards of the modules
    holding them run eagerly. torch's own modules (a bare ``nn.RMSNorm`` or ``nn.Linear`` child)
    stay eager too: compiling one alone finds no frame to compile (dynamo skips torch's files)."""
    for child in module.children():
        if id(child) in eager:
            continue
        if _holds(child, eager):
            compile_around(child, eager)
        elif not type(child).__module__.startswith("torch."):
            child.compile(fullgraph=True)


def _holds(module: nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())
