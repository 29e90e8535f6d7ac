"""Qwen3 (dense) as a plain nn.Module: Llama's block with an RMSNorm on each query and key head
(QK-norm), a head width of its own, and optionally one weight for the embedding and the output
head. Built on the meta device, parallelized, then initialized."""

from __future__ import annotations

import torch
from torch import nn

from raytitan.distributed.attention import CausalAttention, block_causal_mask, document_positions
from raytitan.models.llama3.model import FeedForward, apply_rope, flops_per_token
from raytitan.models.qwen3.args import ModelArgs
from raytitan.models.spec import count_params
from raytitan.models.tied import is_tied, tie_weights


def rope_frequencies(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """Complex rotations [seq_len, head_dim / 2] (plain RoPE, no long-context scaling)."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


class Attention(nn.Module):
    """Causal grouped-query attention whose queries and keys are RMS-normalized per head (over
    head_dim, with a learned scale shared by all heads) before RoPE rotates them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps)
        self.core = CausalAttention()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        # -1 head counts let tensor parallel shard heads without this code knowing.
        q = self.q_norm(self.wq(x).view(bsz, seq_len, -1, self.head_dim))
        k = self.k_norm(self.wk(x).view(bsz, seq_len, -1, self.head_dim))
        v = self.wv(x).view(bsz, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = self.core(q, k, v, mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq_len, -1))

    def init_weights(self, std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        # Depth-scaled init keeps the residual stream's variance flat as layers are added.
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The mask goes by keyword: tensor parallel's input plan covers (x, freqs_cis) only.
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask=mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.feed_forward.init_weights(self.init_std)


class Transformer(nn.Module):
    """Embedding, blocks, norm, output head. A pipeline stage is a Transformer with some of these
    removed (set to None): it then takes and returns hidden states instead of tokens / logits.

    With ``args.tie_embeddings`` the output head's weight *is* the embedding's Parameter
    (``raytitan.models.tied``); ``init_weights``, which the contract calls after ``to_empty``,
    ties them again."""

    block = TransformerBlock  # a family built on Qwen3's (Qwen3-MoE) swaps in its own block

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size is None:
            raise ValueError("ModelArgs.vocab_size is unset: call args.with_vocab(tokenizer.vocab_size)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer id keeps names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): self.block(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        tie_weights(self)
        # Context parallel sets the sequence positions this rank holds, in its local order.
        self.positions: torch.Tensor | None = None
        self.register_buffer("freqs_cis", self._rope(), persistent=False)

    def _rope(self) -> torch.Tensor:
        freqs = rope_frequencies(self.args, self.args.max_seq_len)
        return freqs if self.positions is None else freqs[self.positions]

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``document_ids`` [batch, seq]: attend within documents only, RoPE positions counted
        from each document's start (as Llama 3)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        freqs_cis, mask = self.freqs_cis, None
        if document_ids is not None:
            freqs_cis = self.freqs_cis[document_positions(document_ids)]
            mask = block_causal_mask(document_ids)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask=mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize every parameter and buffer in place (after to_empty / sharding), the tied
        pair tied again first. A tied weight is initialized once, as the output head (std
        dim^-0.5): the embedding's unit normal would make the first logits dim^0.5 times too
        large."""
        device = buffer_device or self.freqs_cis.device
        self.freqs_cis = self._rope().to(device)
        tie_weights(self)
        if self.tok_embeddings is not None and not is_tied(self):
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            bound = 3 * self.args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=self.args.dim**-0.5, a=-bound, b=bound)


def training_flops(args: ModelArgs, model: nn.Module, seq_len: int) -> int:
    """Llama's formula: 6 x (blocks + output head, tied or not) + 12 x layers x heads x head_dim x
    seq_len."""
    return flops_per_token(args, *count_params(model), seq_len)
