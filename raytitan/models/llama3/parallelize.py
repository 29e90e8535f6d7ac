"""Llama 3's tensor-parallel plan; the other parallelisms are the shared ones
(``raytitan.distributed.parallelize``)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from raytitan.distributed.parallelize import parallelize
from raytitan.models.llama3.model import Transformer
from raytitan.models.tied import check_pipeline, tie_weights


def parallelize_llama(model: Transformer, dims, mesh: DeviceMesh, config) -> Transformer:
    """Float8, TP (with sequence and loss parallel), CP, activation checkpointing, compile, then
    FSDP/HSDP, per the JobConfig ``config``."""
    return parallelize(model, dims, mesh, config, tensor_parallel=apply_tensor_parallel)


def top_level_plan(model, loss_parallel: bool) -> dict:
    """A vocab-parallel embedding, a sequence-parallel final norm, and an output head that leaves
    the logits sharded by vocab for a loss-parallel cross entropy (or gathers them); only the
    modules this pipeline stage holds."""
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1),
                                        output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)
    return top


def block_plan() -> dict:
    """Megatron-style TP in a block: column-wise then row-wise linears in attention and MLP (heads
    and hidden units split over ranks), sequence-parallel norms between them (activations split
    along the sequence)."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool,
                          block: dict | None = None) -> None:
    """The top-level plan, then ``block`` (default ``block_plan()``) in every block.

    The embedding and the output head are both sharded by vocab row (Shard(0)), so a tied pair
    stays one Parameter: ``parallelize_module`` gives each module its own DTensor, and the head is
    tied back to the embedding's."""
    top = top_level_plan(model, loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
        tie_weights(model)
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, block or block_plan())


def check_layout(args, dims) -> None:
    """The shape must split into an even head_dim over its heads, and ``check_heads``."""
    if args.dim % args.n_heads or args.head_dim % 2:
        raise ValueError(f"model: dim {args.dim} must split into an even head_dim over {args.n_heads} heads")
    check_heads(args, dims)


def check_heads(args, dims) -> None:
    """Query heads must group evenly over key/value heads; tensor parallel splits attention by
    heads, so its degree must divide both head counts; a tied head cannot sit on another
    pipeline stage than the embedding."""
    if args.n_heads % args.kv_heads:
        raise ValueError(f"model: n_heads {args.n_heads} is not divisible by n_kv_heads {args.kv_heads}")
    if dims.tp > 1:
        for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
            if n % dims.tp:
                raise ValueError(f"parallelism.tensor_parallel_degree {dims.tp} does not divide the model's {what} "
                                 f"({n}): pick a degree that divides both head counts")
    check_pipeline(args, dims)
