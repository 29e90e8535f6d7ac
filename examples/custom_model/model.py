"""A GPT-2-style decoder as a plain nn.Module: learned absolute position embeddings, pre-LayerNorm
blocks with biases, a GELU MLP, multi-head attention, an untied output head.

Nothing here is raytitan-specific except the attention kernel (``CausalAttention``, which context
parallel swaps for ring attention) and the shape of the contract: ``layers`` is a ``ModuleDict``,
``args`` is kept, ``init_weights`` initializes in place, and the embeddings / the final norm and
head may be ``None`` (a pipeline stage that does not hold them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytitan.distributed.attention import CausalAttention


@dataclass(frozen=True)
class GPTArgs:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int | None = None  # None: sized to the tokenizer
    n_positions: int = 1024  # rows of the learned position table: the longest sequence the model takes
    max_seq_len: int = 1024  # raytitan sets it to training.seq_len (at most n_positions)
    norm_eps: float = 1e-5


FLAVORS = {
    "debugmodel": GPTArgs(),
    "124M": GPTArgs(dim=768, n_layers=12, n_heads=12, vocab_size=50257),  # GPT-2 small's shape
}


class Attention(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.head_dim = args.dim // args.n_heads
        self.wq, self.wk, self.wv = (nn.Linear(args.dim, args.dim) for _ in range(3))
        self.wo = nn.Linear(args.dim, args.dim)
        self.core = CausalAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: tensor parallel gives each rank some of the heads without this code knowing.
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        return self.wo(self.core(q, k, v).transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.fc = nn.Linear(args.dim, 4 * args.dim)
        self.proj = nn.Linear(4 * args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(args.dim, eps=args.norm_eps), Attention(args)
        self.ln_2, self.mlp = nn.LayerNorm(args.dim, eps=args.norm_eps), MLP(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        if args.vocab_size is None:
            raise ValueError("GPTArgs.vocab_size is unset (raytitan sizes it to the tokenizer)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.n_positions, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.n_layers)})
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Context parallel sets the sequence positions this rank holds (None: all, in order).
        self.positions: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:  # the first pipeline stage (or the whole model)
            positions = self.positions if self.positions is not None else torch.arange(tokens.shape[1])
            # [1, seq]: tensor parallel splits both embeddings' outputs along the sequence (dim 1).
            h = self.tok_embeddings(tokens) + self.pos_embeddings(positions.to(tokens.device).unsqueeze(0))
        else:
            h = tokens  # hidden states from the previous stage
        for block in self.layers.values():
            h = block(h)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """GPT-2's init, in place: N(0, 0.02), residual projections scaled by depth, zero biases."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                depth_scaled = name.endswith(("attn.wo", "mlp.proj"))
                nn.init.normal_(module.weight, std=0.02 / (2 * self.args.n_layers) ** 0.5 if depth_scaled else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
