"""DeepSeek-V3 shapes. A flavor is data: pick one by name, never branch on it.

Multi-head latent attention (MLA): queries through an optional low-rank bottleneck
(``q_lora_rank``, 0 = one full projection), keys and values from one shared latent of width
``kv_lora_rank`` plus a single RoPE key shared by all heads. Each query/key head is a
``qk_nope_head_dim`` part without position and a ``qk_rope_head_dim`` part RoPE rotates; values
are ``v_head_dim`` wide. The first ``n_dense_layers`` blocks have a dense SwiGLU feed-forward, the
rest the MoE layer of ``raytitan.models.moe``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from raytitan.models.moe import MoEArgs


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 8
    # Multi-head latent attention.
    q_lora_rank: int = 0  # 0: queries by one dim -> heads x qk_head_dim projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # Feed-forwards: the dense layers' SwiGLU width, then the experts'.
    inter_dim: int = 512
    moe_inter_dim: int = 128
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    score_func: str = "sigmoid"
    route_norm: bool = True  # norm_topk_prob
    route_scale: float = 1.0  # routed_scaling_factor
    n_expert_groups: int = 1  # n_group (1: no group-limited routing)
    n_limited_groups: int = 1  # topk_group
    load_balance_coeff: float | None = 1e-3
    # Sequence-wise auxiliary balance loss weight (0: off); set from training.load_balance_loss_weight.
    aux_loss_alpha: float = 0.0
    vocab_size: int | None = None  # None: sized to the tokenizer
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN (as DeepSeek's rope_scaling): None = plain RoPE. With a factor, the rotary frequencies
    # are blended between original and divided-by-factor ones over the band set by beta_fast /
    # beta_slow at rope_original_max_seq_len, and the softmax scale is multiplied by
    # (0.1 x mscale x ln(factor) + 1)^2 (mscale is Hugging Face's mscale_all_dim).
    rope_factor: float | None = None
    rope_original_max_seq_len: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    mscale: float = 1.0
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    use_grouped_mm: bool = True

    def __post_init__(self):
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"ModelArgs.n_dense_layers = {self.n_dense_layers} must be between 0 and n_layers "
                             f"({self.n_layers})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelArgs.qk_rope_head_dim = {self.qk_rope_head_dim} must be even (RoPE rotates pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale squared when RoPE is scaled (as Hugging Face's
        DeepseekV3Attention, whatever the sequence length)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor is not None and self.rope_factor > 1 and self.mscale:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @property
    def moe(self) -> MoEArgs:
        return MoEArgs(dim=self.dim, moe_inter_dim=self.moe_inter_dim, num_experts=self.num_experts, top_k=self.top_k,
                       score_func=self.score_func, route_norm=self.route_norm, route_scale=self.route_scale,
                       num_shared_experts=self.num_shared_experts, n_expert_groups=self.n_expert_groups,
                       n_limited_groups=self.n_limited_groups, load_balance_coeff=self.load_balance_coeff,
                       aux_loss_alpha=self.aux_loss_alpha,
                       use_grouped_mm=self.use_grouped_mm)

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelArgs:
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab_size)
        return self


# Published shapes.
#
# 671B: the config.json of deepseek-ai/DeepSeek-V3 (transformers' DeepseekV3Config defaults agree):
# 61 layers, the first 3 dense (first_k_dense_replace), hidden 7168, dense width 18432, 128 heads,
# q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v_head_dim 128, 256 routed experts
# of width 2048 with 8 active and 1 shared, sigmoid scores, n_group 8 / topk_group 4,
# norm_topk_prob, routed_scaling_factor 2.5, vocab 129280, rope theta 10000 with YaRN factor 40
# (original 4096 positions, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1), 163840
# positions. The release's 14B multi-token-prediction module (layer 61, 685B in all) is not built.
#
# 16B: the shape torchtitan's deepseek_v3 "16B" flavor uses (torchtitan/models/deepseek_v3/__init__.py;
# its README: "adapted from older 16B parameter model"), which is DeepSeek-V2-Lite's config.json
# (deepseek-ai/DeepSeek-V2-Lite): 27 layers, the first dense, hidden 2048, dense width 10944,
# 16 heads, no query compression (q_lora_rank 0), kv_lora_rank 512, qk_nope 128 + qk_rope 64,
# v 128, 64 routed experts of width 1408 with 6 active and 2 shared, softmax scores without
# renormalization or groups, scale 1, vocab 102400, YaRN factor 40 with mscale 0.707.
# Published: "15.7B total parameters, 2.4B activated for each token" (DeepSeek-V2-Lite model card).
FLAVORS: dict[str, ModelArgs] = {
    # Debug runs: 4 layers (1 dense), 8 heads of 32 + 16 (rope), 8 experts of width 128, 2 active
    # + 1 shared, sigmoid group-limited routing over 2 groups (1 kept), scale 2.5: every feature
    # of the 671B recipe at a size a CPU trains in seconds.
    "debugmodel": ModelArgs(n_expert_groups=2, n_limited_groups=1, route_scale=2.5, max_seq_len=2048),
    "16B": ModelArgs(dim=2048, n_layers=27, n_dense_layers=1, n_heads=16, q_lora_rank=0, kv_lora_rank=512,
                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, inter_dim=10944, moe_inter_dim=1408,
                     num_experts=64, num_shared_experts=2, top_k=6, score_func="softmax", route_norm=False,
                     route_scale=1.0, vocab_size=102400, rope_factor=40.0, mscale=0.707, max_seq_len=163840),
    "671B": ModelArgs(dim=7168, n_layers=61, n_dense_layers=3, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, inter_dim=18432, moe_inter_dim=2048,
                      num_experts=256, num_shared_experts=1, top_k=8, score_func="sigmoid", route_norm=True,
                      route_scale=2.5, n_expert_groups=8, n_limited_groups=4, vocab_size=129280, rope_factor=40.0,
                      mscale=1.0, max_seq_len=163840),
}
