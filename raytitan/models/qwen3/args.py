"""Qwen3 dense shapes. A flavor is data: pick one by name, never branch on it.

Unlike Llama, the head width is its own number (``head_dim``, 128 in every published flavor),
not ``dim / n_heads``, and the feed-forward width is given as is (``hidden_dim``, Hugging Face's
``intermediate_size``). The small flavors tie the output head to the token embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int = 64
    hidden_dim: int = 768  # SwiGLU width (intermediate_size)
    vocab_size: int | None = None  # None: sized to the tokenizer
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    # The output head is the token embedding's weight (one Parameter); no pipeline parallel then.
    tie_embeddings: bool = False
    max_seq_len: int = 40960

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return self.hidden_dim

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelArgs:
        """Size the vocab to the tokenizer when the flavor leaves it open."""
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab_size)
        return self


def _published(dim: int, n_layers: int, n_heads: int, hidden_dim: int, tie: bool) -> ModelArgs:
    """A released Qwen3 shape: 8 key/value heads of width 128, vocab 151936, rope theta 1e6."""
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, head_dim=128, hidden_dim=hidden_dim,
                     vocab_size=151936, tie_embeddings=tie)


# Published shapes (the config.json of each Qwen/Qwen3-* release): 0.6B, 1.7B and 4B tie the
# output head to the embedding, 8B, 14B and 32B do not.
FLAVORS: dict[str, ModelArgs] = {
    # Debug runs: head_dim 64 over 8 heads of a 256-wide model (not 256 / 8), tied like the small releases.
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=768,
                            tie_embeddings=True),
    # Many-rank CPU tests: grouped-query, head_dim 32 over 4 heads of a 64-wide model.
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=192, tie_embeddings=True),
    # The same with its own output head: the shape that pipeline parallel can split.
    "tiny_untied": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=192),
    "0.6B": _published(dim=1024, n_layers=28, n_heads=16, hidden_dim=3072, tie=True),
    "1.7B": _published(dim=2048, n_layers=28, n_heads=16, hidden_dim=6144, tie=True),
    "4B": _published(dim=2560, n_layers=36, n_heads=32, hidden_dim=9728, tie=True),
    "8B": _published(dim=4096, n_layers=36, n_heads=32, hidden_dim=12288, tie=False),
    "14B": _published(dim=5120, n_layers=40, n_heads=40, hidden_dim=17408, tie=False),
    "32B": _published(dim=5120, n_layers=64, n_heads=64, hidden_dim=25600, tie=False),
}
