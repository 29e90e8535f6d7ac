"""Qwen3-MoE as a plain nn.Module: Qwen3's blocks (raytitan.models.qwen3) with the
feed-forward replaced by ``raytitan.models.moe.MoE``. Built on the meta device, parallelized,
then initialized."""

from __future__ import annotations

import torch
from torch import nn

from raytitan.models.llama3.model import flops_per_token
from raytitan.models.moe import MoE, activated_params
from raytitan.models.qwen3.model import Attention
from raytitan.models.qwen3.model import Transformer as Qwen3Transformer
from raytitan.models.qwen3_moe.args import ModelArgs
from raytitan.models.spec import count_params


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.moe = MoE(args.moe)
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # depth-scaled, as Qwen3's dense blocks

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask=mask)
        return h + self.moe(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.moe.init_weights(self.init_std)


class Transformer(Qwen3Transformer):
    """Qwen3's embedding, norm, output head, forward and init, with MoE blocks in place of the
    dense ones (no dense feed-forward is ever built)."""

    block = TransformerBlock


def training_flops(args: ModelArgs, model: nn.Module, seq_len: int) -> int:
    """Qwen3's formula over the *activated* parameters: 6 x (blocks with the router and top_k
    experts each + the output head) + 12 x layers x heads x head_dim x seq_len. The FLOPs a token
    costs, not those of every expert, so MFU is not inflated by idle experts."""
    _, active = activated_params(model)
    return flops_per_token(args, active, count_params(model)[1], seq_len)
