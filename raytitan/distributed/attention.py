"""The attention kernel as a module of its own, so a parallelism can swap it: a model calls
``CausalAttention`` and context parallel replaces every instance with ring attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over earlier positions; q [batch, heads, seq, head_dim], k and v
    [batch, kv_heads, seq, head_dim] (grouped-query heads are taken as they are)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
