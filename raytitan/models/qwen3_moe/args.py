"""Qwen3-MoE shapes. A flavor is data: pick one by name, never branch on it.

Qwen3's attention (QK-norm, head_dim 128 of its own, rope theta 1e6) with every feed-forward
a Mixture of Experts: softmax router, top-k experts whose weights are renormalized to sum to 1
(Hugging Face's ``norm_topk_prob``), no shared expert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raytitan.models.moe import MoEArgs


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = 4
    head_dim: int = 64
    moe_inter_dim: int = 128  # each expert's SwiGLU width (moe_intermediate_size)
    num_experts: int = 8
    top_k: int = 2
    route_norm: bool = True  # norm_topk_prob
    # Auxiliary-loss-free balancing (raytitan's training choice; the releases carry no bias).
    load_balance_coeff: float | None = 1e-3
    # Sequence-wise auxiliary balance loss weight (0: off); set from training.load_balance_loss_weight.
    aux_loss_alpha: float = 0.0
    vocab_size: int | None = None  # None: sized to the tokenizer
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_embeddings: bool = False
    max_seq_len: int = 40960
    use_grouped_mm: bool = True

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def moe(self) -> MoEArgs:
        return MoEArgs(dim=self.dim, moe_inter_dim=self.moe_inter_dim, num_experts=self.num_experts, top_k=self.top_k,
                       score_func="softmax", route_norm=self.route_norm, load_balance_coeff=self.load_balance_coeff,
                       aux_loss_alpha=self.aux_loss_alpha,
                       use_grouped_mm=self.use_grouped_mm)

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelArgs:
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab_size)
        return self


def _published(dim: int, n_layers: int, n_heads: int, moe_inter_dim: int) -> ModelArgs:
    """A released Qwen3-MoE shape: 4 key/value heads of width 128, 128 experts with 8 active,
    vocab 151936, rope theta 1e6, untied head, 40960 positions."""
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=4, head_dim=128,
                     moe_inter_dim=moe_inter_dim, num_experts=128, top_k=8, vocab_size=151936)


# Published shapes: the config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads 4, head_dim 128,
# moe_intermediate_size, num_experts 128, num_experts_per_tok 8, norm_topk_prob true,
# decoder_sparse_step 1 with no mlp_only_layers: every layer is MoE). transformers' Qwen3MoeConfig
# defaults (checkpoint Qwen/Qwen3-30B-A3B-Base) agree on the 30B-A3B widths.
FLAVORS: dict[str, ModelArgs] = {
    # Debug runs: 8 experts of width 128, 2 active, over a 256-wide model.
    "debugmodel": ModelArgs(),
    "30B-A3B": _published(dim=2048, n_layers=48, n_heads=32, moe_inter_dim=768),
    "235B-A22B": _published(dim=4096, n_layers=94, n_heads=64, moe_inter_dim=1536),
}
