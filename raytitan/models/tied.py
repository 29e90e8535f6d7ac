"""Tied embeddings, for the families whose args have ``tie_embeddings``: the output head's weight
*is* the token embedding's Parameter (one tensor, one gradient, one optimizer state; saved under
both names). The model ties them when built, and again wherever a Parameter gets replaced:
``to_empty`` from the meta device gives each module a new plain Parameter (sharded DTensor ones
are swapped in place and stay tied), and tensor parallel gives each module its own DTensor."""

from __future__ import annotations

from torch import nn


def tie_weights(model: nn.Module) -> None:
    """Make ``model.output`` use ``model.tok_embeddings``' weight when ``model.args`` ties them
    and this model (or pipeline stage) holds both."""
    if getattr(model.args, "tie_embeddings", False) and model.tok_embeddings is not None \
            and model.output is not None and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight = model.tok_embeddings.weight


def is_tied(model: nn.Module) -> bool:
    return model.tok_embeddings is not None and model.output is not None and \
        model.output.weight is model.tok_embeddings.weight


def check_pipeline(args, dims) -> None:
    """A tied head cannot sit on another pipeline stage than its embedding (a layout check)."""
    if dims.pp > 1 and getattr(args, "tie_embeddings", False):
        raise ValueError(f"parallelism.pipeline_parallel_degree {dims.pp}: this flavor ties the output head to the "
                         "token embedding (one weight), which pipeline parallel would put on two stages; use an "
                         "untied flavor or pipeline_parallel_degree = 1")


def head_flops_params(args) -> int:
    """Parameters a tied head multiplies with that a parameter count leaves out: the count holds the
    shared weight once, as the embedding, which FLOP formulas skip (a lookup)."""
    return args.vocab_size * args.dim if getattr(args, "tie_embeddings", False) else 0
