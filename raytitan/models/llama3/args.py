"""Llama 3 shapes. A flavor is data: pick one by name, never branch on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 16
    n_kv_heads: int | None = None
    vocab_size: int | None = None  # None: sized to the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 long-context frequency scaling (None disables it).
    rope_scaling_factor: float | None = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # The output head is the token embedding's weight (one Parameter); no pipeline parallel then.
    tie_embeddings: bool = False
    max_seq_len: int = 131072

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_vocab(self, tokenizer_vocab_size: int) -> ModelArgs:
        """Size the vocab to the tokenizer when the flavor leaves it open."""
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab_size)
        return self


# Published shapes: Llama 3.2 1B/3B (rope factor 32, the output head tied to the embedding) and
# Llama 3.1 8B/70B/405B (factor 8, an output head of their own), as in each release's config.json.
_LLAMA32_1B = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
                        multiple_of=256, rope_scaling_factor=32.0, tie_embeddings=True)
_LLAMA32_3B = ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
                        multiple_of=256, rope_scaling_factor=32.0, tie_embeddings=True)

FLAVORS: dict[str, ModelArgs] = {
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16),
    # Small enough for many-rank CPU tests; grouped-query like the real flavors.
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32),
    "1B": _LLAMA32_1B,
    "3B": _LLAMA32_3B,
    # The same shapes with an output head of their own: what raytitan trained as 1B / 3B before it
    # tied them (their checkpoints load only into these), and the shapes pipeline parallel can split.
    "1B_untied": dataclasses.replace(_LLAMA32_1B, tie_embeddings=False),
    "3B_untied": dataclasses.replace(_LLAMA32_3B, tie_embeddings=False),
    "8B": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
        ffn_dim_multiplier=1.3, multiple_of=1024,
    ),
    "70B": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
        ffn_dim_multiplier=1.3, multiple_of=4096,
    ),
    "405B": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
        ffn_dim_multiplier=1.2, multiple_of=4096,
    ),
}
