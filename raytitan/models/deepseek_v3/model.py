"""DeepSeek-V3 as a plain nn.Module: multi-head latent attention, dense SwiGLU blocks first, then
blocks whose feed-forward is ``raytitan.models.moe.MoE``. Qwen3's embedding, norm, output head,
forward and init (``raytitan.models.qwen3.model.Transformer``) with these blocks and DeepSeek's
RoPE. Built on the meta device, parallelized, then initialized."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raytitan.models.deepseek_v3.args import ModelArgs
from raytitan.models.llama3.model import FeedForward, apply_rope
from raytitan.models.moe import MoE, activated_params
from raytitan.models.qwen3.model import Transformer as Qwen3Transformer
from raytitan.models.spec import count_params
from raytitan.models.tied import head_flops_params

# The RMSNorms inside MLA (on the query and key/value latents) use this epsilon whatever
# args.norm_eps is, as the released model (and transformers' DeepseekV3Attention) does.
LATENT_NORM_EPS = 1e-6


def rope_frequencies(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """Complex rotations [seq_len, qk_rope_head_dim / 2]. With ``rope_factor`` set, YaRN: each
    frequency is blended between the original one (fast rotations, kept) and the original divided
    by the factor (slow rotations, interpolated) by a linear ramp over the dimensions between
    those that turn beta_fast and beta_slow times in rope_original_max_seq_len positions (the
    bounds floored / ceiled to whole dimensions, as the DeepSeek releases compute them)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor is not None:
        def dimension_of(turns: float) -> float:  # the dimension whose wavelength fits `turns` times
            return dim * math.log(args.rope_original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dimension_of(args.rope_beta_fast)), 0)
        high = min(math.ceil(dimension_of(args.rope_beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


class Attention(nn.Module):
    """Multi-head latent attention. Queries: ``wq`` (dim -> heads x qk_head_dim), or with a query
    rank ``wq_a`` -> RMSNorm ``q_norm`` -> ``wq_b``. Keys and values: ``wkv_a`` projects to a latent
    of kv_lora_rank plus one RoPE key of qk_rope_head_dim shared by every head; the latent,
    RMS-normalized (``kv_norm``), goes through ``wkv_b`` to each head's non-rotated key part and
    value. A head's query/key is [nope part, rope part]; causal scaled-dot-product attention with
    ``args.softmax_scale``; ``wo`` maps heads x v_head_dim back to dim."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.scale = args.softmax_scale
        qk = args.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, self.n_heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        # The shared RoPE key before rotation; no weights. Tensor parallel gathers it here over the
        # sequence (raytitan.models.deepseek_v3.parallelize); otherwise it passes unchanged.
        self.rope_key = nn.Identity()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Shapes from the projections, not from x: under tensor parallel x is this rank's shard of
        # the sequence and the projections give the whole sequence for this rank's heads.
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.unflatten(-1, (-1, self.nope + self.rope))
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, freqs_cis)], dim=-1)

        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        k_rope = apply_rope(self.rope_key(k_rope).unsqueeze(2), freqs_cis)  # one rotated key for all heads
        kv = self.wkv_b(self.kv_norm(latent)).unflatten(-1, (-1, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.wo(out.transpose(1, 2).flatten(2))

    def init_weights(self, std: float) -> None:
        projections = [self.wkv_a, self.wkv_b]
        projections += [self.wq] if self.q_lora_rank == 0 else [self.wq_a, self.wq_b]
        for w in projections:
            nn.init.trunc_normal_(w.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=std)
        self.kv_norm.reset_parameters()
        if self.q_lora_rank:
            self.q_norm.reset_parameters()


class TransformerBlock(nn.Module):
    """MLA, then a dense SwiGLU (``feed_forward``, the first n_dense_layers blocks) or the MoE
    layer (``moe``, the others); pre-norm residuals."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if layer_id < args.n_dense_layers:
            self.feed_forward, self.moe = FeedForward(args.dim, args.inter_dim), None
        else:
            self.feed_forward, self.moe = None, MoE(args.moe)
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # depth-scaled, as the other families

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask=mask)
        ffn = self.feed_forward if self.moe is None else self.moe
        return h + ffn(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        (self.feed_forward if self.moe is None else self.moe).init_weights(self.init_std)


class Transformer(Qwen3Transformer):
    """Qwen3's embedding, norm, output head, forward (document masking included) and init, with
    DeepSeek-V3's blocks and RoPE (rotating qk_rope_head_dim features, YaRN when scaled)."""

    block = TransformerBlock

    def _rope(self) -> torch.Tensor:
        freqs = rope_frequencies(self.args, self.args.max_seq_len)
        return freqs if self.positions is None else freqs[self.positions]


def training_flops(args: ModelArgs, model: nn.Module, seq_len: int) -> int:
    """6 x the *activated* parameters that multiply (blocks with the router, shared and top_k
    routed experts each, plus the output head; not the embedding) + the attention scores and
    their weighted sum: 6 x layers x heads x (qk_head_dim + v_head_dim) x seq_len. The FLOPs a
    token costs, not those of every expert, so MFU is not inflated by idle experts."""
    _, active = activated_params(model)
    embedding = count_params(model)[1]
    matmul = active - embedding + head_flops_params(args)
    return 6 * matmul + 6 * args.n_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
