"""Context parallel: each rank holds a slice of every sequence and attends over all of it.

The sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r (head and tail),
so every rank gets the same share of the causal mask's work. Attention all-gathers keys and
values from the other ranks of the cp group (differentiably) and masks by true position. This
runs on any backend, gloo included; memory for K/V is that of the full sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single
import torch.nn.functional as F
from torch import nn


def load_balanced_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The sequence positions rank ``cp_rank`` holds, in its local order (head chunk, then tail)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context parallel degree {cp}")
    chunk = seq_len // (2 * cp)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([head, tail])


def shard_sequence(t: torch.Tensor, positions: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``t`` along its sequence dimension."""
    return t.index_select(dim, positions.to(t.device))


class ContextParallelAttention(nn.Module):
    """Causal attention for a rank holding ``positions`` of each sequence; q, k, v [b, h, s, d]."""

    def __init__(self, group: dist.ProcessGroup, positions: torch.Tensor, all_positions: torch.Tensor):
        super().__init__()
        self.group = group
        # Query i may see key j when position(i) >= position(j); keys arrive as all_gather returns
        # them, every rank's positions by rank. Not a buffer: to_empty() must not wipe it.
        self.mask = positions[:, None] >= all_positions[None, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Differentiable: the backward reduce-scatters each rank's K/V gradients back to their owners.
        k = all_gather_single(k.contiguous(), gather_dim=2, group=self.group)
        v = all_gather_single(v.contiguous(), gather_dim=2, group=self.group)
        if self.mask.device != q.device:
            self.mask = self.mask.to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup, seq_len: int) -> torch.Tensor:
    """Give ``model`` (a Transformer or a pipeline stage of one) this rank's positions: rotary
    frequencies for them and attention over the whole sequence. Returns the positions, which
    also select this rank's inputs and labels."""
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    positions = load_balanced_positions(seq_len, cp, rank)
    all_positions = torch.cat([load_balanced_positions(seq_len, cp, r) for r in range(cp)])
    model.rope_positions = positions
    for block in model.layers.values():
        block.attention.core = ContextParallelAttention(cp_group, positions, all_positions)
    return positions
