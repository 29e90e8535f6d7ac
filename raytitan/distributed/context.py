"""Context parallel: each rank holds a slice of every sequence and attends over all of it.

Sharding: the sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r (head and
tail), so every rank gets the same share of the causal mask's work. This is the layout torch's
load-balanced ring attention assumes (a test checks it against torch's head-tail balancer).

Attention: torch's ring attention (``torch.distributed.tensor.experimental``) runs one fused
attention call per K/V chunk and merges the partial results by their log-sum-exp. torch reaches
it only by DTensor dispatch of the CUDA kernels; here it is called directly with the fused
kernel of the device (flash attention on CUDA, its CPU counterpart on CPU), so one code path runs
on NCCL and on gloo. K/V travel by ``context_parallel_rotate_method``: ``allgather`` gathers the
other ranks' K/V once (one collective, memory for the whole sequence's K/V) and ``alltoall``
passes them round the ring cp - 1 times (memory for two ranks' K/V).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from raytitan.distributed.attention import CausalAttention

aten = torch.ops.aten
ROTATE_METHODS = ("allgather", "alltoall")


def load_balanced_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The sequence positions rank ``cp_rank`` holds, in its local order (head chunk, then tail)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context parallel degree {cp}")
    chunk = seq_len // (2 * cp)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([head, tail])


def shard_sequence(t: torch.Tensor, positions: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``t`` along its sequence dimension."""
    return t.index_select(dim, positions.to(t.device))


class TorchRing:
    """The one place context parallel reaches into torch's private API (torch 2.13): the ring
    attention of ``torch.distributed.tensor.experimental._context_parallel._attention`` (forward,
    backward, its process-wide options and rotate methods) and ``_resolve_process_group`` (a
    custom op takes its group by name). Looked up once (``_ring()``), not on every attention call;
    tests/test_private_apis.py checks every name and signature used here."""

    def __init__(self):
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group
            from torch.distributed.tensor.experimental._context_parallel import _attention

            self.forward = _attention._templated_ring_attention
            self.backward = _attention._templated_ring_attention_backward
            self.rotate_methods = {"allgather": _attention._RotateMethod.ALL_GATHER,
                                   "alltoall": _attention._RotateMethod.ALL_TO_ALL}
            _attention._cp_options  # noqa: B018  read at each call: see options()
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"context parallel calls torch's ring attention, which this torch "
                               f"{torch.__version__} does not have where torch 2.13 keeps it ({e}); "
                               "install torch 2.13") from e
        self.module, self.group = _attention, _resolve_process_group

    @contextlib.contextmanager
    def options(self, rotate_method: str):
        """torch reads its ring settings from process-wide options: set ours for one call."""
        options = self.module._cp_options
        saved = options.enable_load_balance, options.rotate_method
        options.enable_load_balance = True  # the head-tail layout above
        options.rotate_method = self.rotate_methods[rotate_method]
        try:
            yield
        finally:
            options.enable_load_balance, options.rotate_method = saved


@functools.cache
def _ring() -> TorchRing:
    return TorchRing()


@dataclass(frozen=True)
class FusedKernel:
    """A fused attention forward/backward pair that returns the log-sum-exp the ring merges by.

    ``backward_kwargs(q, k)`` gives the backward's extra arguments. Without dropout, CUDA's
    random-state arguments are not read; the sequence lengths are those of the whole call."""

    forward: Any
    backward: Any
    backward_kwargs: Callable[[torch.Tensor, torch.Tensor], dict]


KERNELS = {
    "cpu": FusedKernel(aten._scaled_dot_product_flash_attention_for_cpu.default,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                       lambda q, k: {}),
    "cuda": FusedKernel(aten._scaled_dot_product_flash_attention.default,
                        aten._scaled_dot_product_flash_attention_backward.default,
                        lambda q, k: dict(cum_seq_q=None, cum_seq_k=None, max_q=q.size(2), max_k=k.size(2),
                                          philox_seed=q.new_zeros(2, dtype=torch.uint64),
                                          philox_offset=q.new_zeros((), dtype=torch.uint64))),
}


def kernel_for(t: torch.Tensor) -> FusedKernel:
    if t.device.type not in KERNELS:
        raise RuntimeError(f"context parallel attention has no fused kernel for {t.device.type} tensors")
    if t.device.type == "cuda" and t.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"context parallel on CUDA runs flash attention, which needs bfloat16 or float16 "
                           f"inputs, not {t.dtype}: keep training.mixed_precision_param = auto or bfloat16")
    return KERNELS[t.device.type]


# A custom op, so torch.compile keeps the ring (collectives and fused kernels) whole inside a
# compiled block and selective activation checkpointing can keep its output as one op.
@torch.library.custom_op("raytitan::ring_attention", mutates_args=())
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str,
                   rotate_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the load-balanced chunks of the cp group; returns (out, log-sum-exp)."""
    ring = _ring()
    with ring.options(rotate_method):
        out, lse, *_ = ring.forward(ring.group(group_name), 2, kernel_for(q).forward, q, k, v, is_causal=True,
                                    dropout_p=0.0)
    return out.contiguous(), lse.contiguous()


@ring_attention.register_fake
def _(q, k, v, group_name, rotate_method):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("raytitan::ring_attention_backward", mutates_args=())
def ring_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, group_name: str, rotate_method: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = kernel_for(q)
    ring = _ring()
    with ring.options(rotate_method):
        grads = ring.backward(
            ring.group(group_name), 2, kernel.backward, grad_out=grad_out.contiguous(),
            grad_out_name="grad_out", query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=True,
            dropout_p=0.0, **kernel.backward_kwargs(q, k))
    grad_q, grad_k, grad_v = grads[:3]
    # torch returns grad_k and grad_v as views of one received buffer; an op's outputs may not alias.
    return grad_q.contiguous(), grad_k.clone(), grad_v.clone()


@ring_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, group_name, rotate_method):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _save_for_backward(ctx, inputs, output):
    q, k, v, ctx.group_name, ctx.rotate_method = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_out, grad_lse):
    grads = ring_attention_backward(grad_out, *ctx.saved_tensors, ctx.group_name, ctx.rotate_method)
    return (*grads, None, None)


ring_attention.register_autograd(_backward, setup_context=_save_for_backward)


class RingAttention(nn.Module):
    """Causal attention for a rank holding the load-balanced chunks of each sequence; q [b, h, s, d],
    k and v [b, kv_h, s, d] (the kernels take grouped-query heads as they are)."""

    def __init__(self, group: dist.ProcessGroup, rotate_method: str = "allgather"):
        super().__init__()
        if rotate_method not in ROTATE_METHODS:
            raise ValueError(f"parallelism.context_parallel_rotate_method = {rotate_method!r} is not one of "
                             f"{', '.join(ROTATE_METHODS)}")
        self.group_name, self.rotate_method = group.group_name, rotate_method

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("context parallel attention is causal over whole rows: model.attn_mask_type = "
                             "'block_causal' needs parallelism.context_parallel_degree = 1")
        return ring_attention(q, k, v, self.group_name, self.rotate_method)[0]


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup, seq_len: int,
                           rotate_method: str = "allgather") -> torch.Tensor:
    """Give ``model`` (a whole model or a pipeline stage of one) this rank's positions (its
    ``positions`` attribute, which its position encoding indexes) and ring attention over the
    whole sequence in place of each ``CausalAttention``. Returns the positions, which also select
    this rank's inputs and labels."""
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    positions = load_balanced_positions(seq_len, cp, rank)
    model.positions = positions
    kernels = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, CausalAttention)]
    if not kernels:
        raise ValueError(f"{type(model).__name__} has no CausalAttention module for context parallel to replace")
    for parent, name in kernels:
        setattr(parent, name, RingAttention(cp_group, rotate_method))
    return positions
