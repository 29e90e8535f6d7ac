"""The training loss: summed token cross entropy, so callers choose the normalizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross entropy; works on vocab-sharded DTensor logits under loss_parallel."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def build_loss(compile_loss: bool):
    """The summed cross entropy, compiled (``compile.components`` has "loss") or not."""
    return torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum
