"""The attention kernel as a module of its own, so a parallelism can swap it: a model calls
``CausalAttention`` and context parallel replaces every instance with ring attention.

Document masking (``model.attn_mask_type = "block_causal"``): rows are packed documents, each
written as BOS text EOS (``raytitan.components.data.stream``). The runner turns a row's tokens
into ``document_ids`` (a new document at every BOS); a model builds ``block_causal_mask`` and
``document_positions`` from them once per forward and hands the mask to every block, so tokens
attend only to earlier tokens of their own document and RoPE counts positions from each
document's start. The tokens before a row's first BOS (the end of a document the window cut)
are one document starting at position 0.

The kernel for masks is ``scaled_dot_product_attention`` with a boolean mask, on every device.
torch 2.13's flex attention has no backward on CPU ("FlexAttention does not support backward on
CPU"), so it cannot train here; see docs/parallelism.md for the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTN_MASK_TYPES = ("causal", "block_causal")  # model.attn_mask_type


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[batch, seq] int32: which document of its row each token belongs to (0, 1, ...); a
    document starts at each ``bos_id``."""
    return torch.cumsum(tokens == bos_id, dim=1, dtype=torch.int32)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] int64: each token's position within its document (0 at the document's start)."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] bool, True where query i may attend key j: j <= i in the same document
    (broadcast over heads). Never an empty row: a token always sees itself."""
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    return same.tril()


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over earlier positions (or, given ``mask`` from
    ``block_causal_mask``, over the positions it allows); q [batch, heads, seq, head_dim], k and v
    [batch, kv_heads, seq, head_dim] (grouped-query heads are taken as they are)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
