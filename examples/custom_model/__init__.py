"""A user's own model family for raytitan: train it with

    python -m raytitan.train --model.name examples.custom_model:spec --model.flavor debugmodel

The model (``model.py``) is plain PyTorch; this file tells raytitan how to shard it. Copy the
folder, change the model, and keep the tensor-parallel plan in step with its module names.
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
)

from examples.custom_model.model import FLAVORS, GPT, GPTArgs
from raytitan.distributed.parallelize import parallelize
from raytitan.models.spec import ModelSpec, count_params


def tensor_parallel(model: GPT, tp_mesh, loss_parallel: bool) -> None:
    """Megatron-style: heads and MLP units split over the ranks; between blocks the activations
    are split along the sequence (norms run sequence-parallel)."""
    top = {
        # Each embedding's output is split along the sequence, so their sum is too.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "pos_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # Logits split by vocabulary for a loss-parallel cross entropy, or gathered.
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    # A pipeline stage holds only some of these.
    parallelize_module(model, tp_mesh, {name: style for name, style in top.items() if getattr(model, name) is not None})
    to_block = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "ln_1": SequenceParallel(), "attn": to_block,
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(), "mlp": to_block,
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        })


def check_layout(args: GPTArgs, dims) -> None:
    """What the shape cannot do, raised as a config error before anything starts."""
    if args.dim % args.n_heads:
        raise ValueError(f"model: dim {args.dim} does not split into {args.n_heads} heads")
    if args.n_heads % dims.tp:
        raise ValueError(f"parallelism.tensor_parallel_degree {dims.tp} does not divide the model's "
                         f"{args.n_heads} heads")
    if args.max_seq_len > args.n_positions:
        raise ValueError(f"training.seq_len {args.max_seq_len} is longer than the model's {args.n_positions} positions")


def flops_per_token(args: GPTArgs, model: GPT, seq_len: int) -> int:
    """Training FLOPs per token, for MFU: 6 x non-embedding parameters (the default) plus
    attention's score and value matmuls."""
    total, embeddings = count_params(model)
    return 6 * (total - embeddings) + 12 * args.n_layers * args.dim * seq_len


spec = ModelSpec(
    name="gpt",
    args=GPTArgs,
    flavors=FLAVORS,
    build=GPT,
    # Float8, TP (with the plan above), CP, activation checkpointing, compile, FSDP: the generic order.
    parallelize=functools.partial(parallelize, tensor_parallel=tensor_parallel),
    first_stage_modules=("tok_embeddings", "pos_embeddings"),
    last_stage_modules=("norm", "output"),
    check_layout=check_layout,
    flops_per_token=flops_per_token,
    supports_tensor_parallel=True,
    supports_context_parallel=True,
)
