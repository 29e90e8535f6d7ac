"""The model interface: what the rest of raytitan knows of a model family.

A family is one ``ModelSpec``. Everything outside ``raytitan/models`` builds, parallelizes,
counts, checkpoints, converts and samples models through it, and never names a family.

What a spec's model must be (the contract the trainer relies on):
- ``build(args)`` returns an ``nn.Module`` without touching memory when called under
  ``torch.device("meta")``; ``forward(tokens [batch, seq]) -> logits [batch, seq, vocab]``.
- Its blocks sit in ``model.layers``, an ``nn.ModuleDict`` keyed ``"0"`` .. ``str(n_layers - 1)``:
  activation checkpointing, compile and FSDP wrap them one by one, pipeline stages keep a run.
- A pipeline stage is the model with the layers of other stages deleted and the modules named by
  ``first_stage_modules`` / ``last_stage_modules`` set to ``None`` where the stage is not first /
  last; ``forward`` then passes hidden states in and out.
- It keeps its args as ``model.args``; ``init_weights(buffer_device=None)`` initializes every parameter and buffer in place (after the
  model was materialized with ``to_empty``), sharded or not.
- ``args`` is a frozen dataclass with at least ``vocab_size`` (the published size, or ``None``;
  the model is built at the tokenizer's), ``n_layers`` and ``max_seq_len``; flavors are named
  instances of it. Optionally ``tie_embeddings``: the output head is the token embedding's
  Parameter (``raytitan.models.tied``), and steps saved untied do not load into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class ModelSpecError(ValueError):
    """A model spec that cannot be found or used; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """One model family. Only ``name``, ``args``, ``flavors``, ``build`` and ``parallelize`` are
    required; the rest say what else the family supports."""

    name: str
    args: type  # the frozen dataclass of the family's shape; flavors are instances of it
    flavors: Mapping[str, Any]
    build: Callable[[Any], nn.Module]  # args -> model (called under torch.device("meta"))
    # (model, dims, mesh, config) -> model, on meta: Float8, TP, CP, AC, compile, FSDP, in that order.
    parallelize: Callable[..., nn.Module]
    # Modules only the first / last pipeline stage holds (set to None elsewhere).
    first_stage_modules: tuple[str, ...] = ("tok_embeddings",)
    last_stage_modules: tuple[str, ...] = ("norm", "output")
    # (args, dims) -> None; raises ValueError naming what in the shape the layout cannot split.
    check_layout: Callable[[Any, Any], None] | None = None
    # (args, model on meta, seq_len) -> training FLOPs per token, for MFU; default 6 x non-embedding params.
    flops_per_token: Callable[[Any, nn.Module, int], int] | None = None
    hf: Any = None  # a raytitan.models.hf.HFAdapter, or None: no Hugging Face import/export
    # True when its weight names and tensor layouts are those of torchtitan's model of the family
    # (torchtitan v0.2.x names): torchtitan's DCP steps then load and export by renaming alone.
    torchtitan_names: bool = False
    supports_context_parallel: bool = False
    supports_tensor_parallel: bool = False
    # model.attn_mask_type = "block_causal": forward(tokens, document_ids=...) attends within documents
    # (raytitan.distributed.attention: document_positions for RoPE, block_causal_mask to every CausalAttention).
    supports_block_causal: bool = False
    # (model parts, data-parallel group or None) -> None, after every applied optimizer step: state
    # the model keeps outside its gradients (an MoE layer's load-balancing bias), updated alike on
    # every data-parallel rank. None: nothing to do.
    after_optimizer_step: Callable[[list[nn.Module], Any], None] | None = None
    # (model parts) -> {name: value}, merged into every logged step's metrics (log line, metrics.jsonl,
    # TensorBoard), called on every rank at the same steps (an MoE family's expert load). None: nothing.
    metrics: Callable[[list[nn.Module]], dict[str, float]] | None = None

    def flavor(self, name: str) -> Any:
        if name not in self.flavors:
            raise ModelSpecError(f"model.flavor = {name!r} is not a {self.name} flavor: one of {', '.join(self.flavors)}")
        return self.flavors[name]

    def args_from_dict(self, values: dict) -> Any:
        """The shape a checkpoint recorded (``dataclasses.asdict`` of the args) as args again."""
        known = {f.name for f in dataclasses.fields(self.args)}
        return self.args(**{k: v for k, v in values.items() if k in known})

    def training_flops_per_token(self, args: Any, model: nn.Module, seq_len: int) -> int:
        if self.flops_per_token is not None:
            return self.flops_per_token(args, model, seq_len)
        total, embedding = count_params(model)
        return 6 * (total - embedding)


def with_vocab(args: Any, tokenizer_vocab_size: int) -> Any:
    """Size the vocab to the tokenizer when the flavor leaves it open (``vocab_size = None``)."""
    if args.vocab_size is None:
        return dataclasses.replace(args, vocab_size=tokenizer_vocab_size)
    return args


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, token-embedding parameters); a tied output head counts once."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return total, embedding


def build_meta(spec: ModelSpec, args: Any) -> nn.Module:
    """The whole model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return spec.build(args)
