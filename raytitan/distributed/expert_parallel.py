"""Expert parallel for the MoE layer of ``raytitan.models.moe``: each of ``ep`` ranks holds
``num_experts / ep`` of every layer's experts, and tokens travel to their experts and back by
all-to-all.

How a layer's tokens move (``TokenDispatcher``, around ``GroupedExperts.forward``):

1. the router has chosen, on every rank, experts for its own tokens; ``MoE.forward`` sorts the
   (token, choice) rows by expert and counts the rows per expert (over all experts);
2. the counts are exchanged first (an all-to-all of ``num_experts`` integers), so each rank
   learns how many rows every other rank sends to each of its local experts;
3. the rows are exchanged (one all-to-all with uneven splits; rank ``r`` receives the rows for
   experts ``r * local .. (r + 1) * local - 1``) and re-sorted by local expert;
4. the local experts run in one grouped matmul; the results are put back in arrival order, sent
   back by the reverse all-to-all, and ``MoE.forward`` combines them with the router weights as
   on one rank.

Both token exchanges go through ``exchange`` (torch's functional all-to-all, autograd-aware:
its backward is the reverse exchange), so gradients of the tokens and of the expert weights
come back the same way. Only collectives that gloo and NCCL both implement are used (run on
gloo here, in float32 and bfloat16, with ranks that receive no rows). The router counts tokens
per expert before dispatch, over all experts, so the load-balancing bias update (summed over the
data-parallel ranks) sees global counts exactly as without expert parallel.

The expert weights become DTensors sharded on the expert dimension (``Shard(0)``) over the
``ep`` mesh dimension, so checkpoints hold whole ``[num_experts, ...]`` tensors and DCP reshards
them to any other expert-parallel degree or to one process. FSDP then shards them further over
the ``efsdp`` dimension (see ``raytitan.distributed.parallelize.apply_fsdp``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

# What a module declares to be split by expert parallel: the names of its Parameters stacked
# over experts on dim 0 (``raytitan.models.moe.GroupedExperts`` declares w1, w2, w3). Its forward
# takes (rows sorted by expert, rows per expert) and returns one output row per input row.
EXPERT_WEIGHTS = "expert_parallel_weights"


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose weights expert parallel splits."""
    return [m for m in model.modules() if getattr(type(m), EXPERT_WEIGHTS, None)]


def exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
             group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of the rows of ``x`` with uneven splits, differentiable (its backward is the
    reverse exchange).

    The one call of a private torch API for expert parallel (torch 2.13; listed in
    tests/test_private_apis.py): ``torch.distributed._functional_collectives.all_to_all_single``,
    autograd-aware in 2.13 (``all_to_all_single_autograd`` is now an alias of it). The public
    ``torch.distributed.nn.functional.all_to_all_single`` works too but is deprecated in its
    favour (a FutureWarning at every call)."""
    out = funcol.all_to_all_single(x.contiguous(), output_splits, input_splits, group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


class TokenDispatcher:
    """The all-to-all around one layer's ``GroupedExperts``: ``dispatch`` takes the experts'
    input (rows sorted by global expert, rows per global expert) and gives theirs on this rank
    (rows received from every rank, sorted by local expert, rows per local expert); ``combine``
    sends the results back to the rows' ranks, in the order they came in. What ``combine`` needs
    is kept from the last ``dispatch`` (a recomputed forward under activation checkpointing
    dispatches again before it combines)."""

    def __init__(self, group: dist.ProcessGroup, ep: int):
        self.group, self.ep = group, ep
        self._last: tuple[torch.Tensor, list[int], list[int]] | None = None

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ep = self.ep
        local = counts.numel() // ep
        with torch.no_grad():
            received = torch.empty_like(counts)  # [source rank, local expert] rows sent here
            dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        # One host sync for both split lists (the all-to-all needs them as Python ints).
        send, recv = torch.stack([counts.view(ep, local).sum(1), received.view(ep, local).sum(1)]).tolist()
        rows = exchange(x, recv, send, self.group)
        # Rows arrive by source rank, each source's rows by local expert: order them by local
        # expert, then source (a stable sort keeps each source's order within an expert).
        block = torch.repeat_interleave(torch.arange(ep * local, device=counts.device), received)
        order = ((block % local) * ep + block // local).argsort(stable=True)
        self._last = (order, send, recv)
        return rows[order], received.view(ep, local).sum(0)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        order, send, recv = self._last
        self._last = None
        return exchange(y[order.argsort()], send, recv, self.group)


def shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> TokenDispatcher:
    """Shard ``experts``' stacked weights on the expert dimension over ``ep_mesh`` and route its
    inputs and outputs through a ``TokenDispatcher`` (forward hooks, public
    ``distribute_module``). Works on the meta device, before FSDP and materialization.

    ``ep_mesh`` may be 2-D, ('ep', 'tp') under tensor parallel: the weights are then replicated
    over 'tp', where each rank computes the tokens of its own sequence shard, and their gradients
    are partial sums over it (``raytitan.models.moe.GroupedExperts.weights`` says so to autograd;
    FSDP adds them up before its reduce-scatter). Tokens travel over 'ep' only."""
    dispatcher = TokenDispatcher(ep_mesh.get_group(0), ep_mesh.size(0))
    names = getattr(type(experts), EXPERT_WEIGHTS)
    placements = [Shard(0)] + [Replicate()] * (ep_mesh.ndim - 1)

    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if module is experts:
            for pname in names:
                param = getattr(module, pname)
                module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, placements)))

    def dispatch(module, inputs, mesh):
        return dispatcher.dispatch(*inputs)

    def combine(module, output, mesh):
        return dispatcher.combine(output)

    distribute_module(experts, ep_mesh, partition, input_fn=dispatch, output_fn=combine)
    # combine returns the received buffer itself (an alias), which FSDP warns about once per
    # forward in case the caller changes it in place; MoE.forward never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")
    return dispatcher


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, stage: bool = False) -> None:
    """Split the experts of every expert module of ``model`` (a whole model, or with ``stage`` a
    pipeline stage) over ``ep_mesh`` (('ep', 'tp') under tensor parallel: ``shard_experts``). A
    whole model without expert modules is an error: the degree would be ignored; a stage may have
    none (its blocks are dense) while other stages do."""
    ep = ep_mesh.size(0)
    modules = expert_modules(model)
    if not modules and not stage:
        raise ValueError(f"parallelism.expert_parallel_degree = {ep}, but {type(model).__name__} has no experts to "
                         "split (no module declares expert_parallel_weights): set parallelism.expert_parallel_degree = 1")
    for experts in modules:
        n = getattr(experts, getattr(type(experts), EXPERT_WEIGHTS)[0]).shape[0]
        if n % ep:
            raise ValueError(f"parallelism.expert_parallel_degree = {ep} does not divide the {n} experts of "
                             f"{type(experts).__name__}")
        shard_experts(experts, ep_mesh)
