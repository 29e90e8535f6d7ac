"""Context parallel: the sequence layout, and ring attention equal to full causal attention."""

import pytest
import torch

from raytitan.distributed.attention import CausalAttention
from raytitan.distributed.context import (
    KERNELS, ROTATE_METHODS, RingAttention, kernel_for, load_balanced_positions, shard_sequence,
)

from tests.helpers import spawn


def test_positions_balance_the_causal_work_and_cover_the_sequence():
    seq, cp = 32, 4
    held = [load_balanced_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(seq))
    # Attention work of a query is its position + 1: head + tail chunks make every rank's sum equal.
    work = [int((p + 1).sum()) for p in held]
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="not divisible by 2 x context parallel degree 4"):
        load_balanced_positions(36, cp, 0)


def test_positions_are_the_layout_torchs_ring_attention_balances_for():
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    seq, cp = 48, 3
    torch_order = _HeadTailLoadBalancer(seq, cp, "cpu")._generate_indices()[0]
    assert torch.equal(torch.cat([load_balanced_positions(seq, cp, r) for r in range(cp)]), torch_order)


def test_the_cuda_kernel_binds_its_forward_outputs_to_its_backward():
    """The CUDA flash-attention pair, run on meta tensors: what the forward returns after (out, lse)
    must feed the backward's arguments (a GPU run is the only other place this is exercised)."""
    kernel = KERNELS["cuda"]
    q = torch.empty(2, 4, 16, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 16, 64, device="meta", dtype=torch.bfloat16)
    out, lse, *rest = kernel.forward(q, k, k, is_causal=True, dropout_p=0.0)
    grads = kernel.backward(grad_out=out, query=q, key=k, value=k, out=out, logsumexp=lse, is_causal=True,
                            dropout_p=0.0, **kernel.backward_kwargs(q, k))
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]


def test_cuda_refuses_float32_attention_and_unknown_rotate_methods_with_advice():
    with pytest.raises(RuntimeError, match="needs bfloat16"):
        kernel_for(_On("cuda", torch.float32))
    assert kernel_for(_On("cuda", torch.bfloat16)) is KERNELS["cuda"]
    with pytest.raises(ValueError, match="rotate_method = 'ring' is not one of allgather, alltoall"):
        RingAttention(None, "ring")


class _On:
    """Just the device and dtype of a tensor on a device this machine may not have."""

    def __init__(self, device, dtype):
        self.device, self.dtype = torch.device(device), dtype


KV_EXCHANGES = ("_c10d_functional::all_gather_into_tensor", "_c10d_functional::all_to_all_single")


def _compare(rank: int, world: int) -> dict:
    """Per rotate method: the largest differences from full attention, and the forward's K/V exchanges."""
    import torch.distributed as dist

    torch.manual_seed(0)
    seq = 8 * world
    q, k, v = (torch.randn(2, heads, seq, 8, requires_grad=True) for heads in (4, 2, 2))
    grad_out = torch.randn(2, 4, seq, 8)
    full = CausalAttention()(q, k, v)
    (full * grad_out).sum().backward()
    positions = load_balanced_positions(seq, world, rank)

    def diff(a, b):
        return (a - shard_sequence(b, positions, dim=2)).abs().max().item()

    results = {}
    for rotate_method in ROTATE_METHODS:
        local = [shard_sequence(t.detach(), positions, dim=2).requires_grad_() for t in (q, k, v)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = RingAttention(dist.group.WORLD, rotate_method)(*local)
        (out * shard_sequence(grad_out, positions, dim=2)).sum().backward()
        results[rotate_method] = {
            "diffs": {"out": diff(out, full), **{n: diff(t.grad, f.grad) for n, t, f in zip("qkv", local, (q, k, v))}},
            "forward_exchanges": sorted(e.name for e in prof.events() if e.name in KV_EXCHANGES)}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_full_attention(tmp_path, world):
    """Forward and gradients (grouped-query heads) in fp32, with either rotate method; the ring
    merges partial results in fp32. The forward moves K/V as the method says: one all-gather, or
    cp - 1 passes round the ring."""
    expected = {"allgather": ["_c10d_functional::all_gather_into_tensor"],
                "alltoall": ["_c10d_functional::all_to_all_single"] * (world - 1)}
    for rank, results in enumerate(spawn(_compare, world, str(tmp_path))):
        assert results.keys() == expected.keys()
        for method, result in results.items():
            assert max(result["diffs"].values()) < 1e-5, (rank, method, result)
            assert result["forward_exchanges"] == expected[method], (rank, method, result)


def _ring_calls_in_backward(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from raytitan.models.llama3.model import Transformer
    from raytitan.distributed.activation_checkpoint import apply_activation_checkpointing
    from raytitan.distributed.context import apply_context_parallel
    from raytitan.components.loss import cross_entropy_sum
    from tests.test_speed_features import ARGS, CountOps, tokens

    batch = tokens(seq=8 * world + 1)
    results = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Transformer(ARGS)
        positions = apply_context_parallel(model, dist.group.WORLD, 8 * world)
        model.init_weights()
        apply_activation_checkpointing(model, mode, "op")
        inputs, labels = (shard_sequence(t, positions) for t in (batch[:, :-1], batch[:, 1:]))
        loss = cross_entropy_sum(model(inputs), labels) / labels.numel()
        with CountOps((torch.ops.raytitan.ring_attention.default,)) as counter:
            loss.backward()
        results[mode] = {"calls": counter.count, "grads": [p.grad.sum().item() for p in model.parameters()]}
    return results


@pytest.mark.slow
def test_per_op_checkpointing_keeps_the_ring_output(tmp_path):
    """Under the per-op policy backward runs no ring attention again (and so no K/V exchange);
    full checkpointing reruns it once per block. Gradients are the same either way."""
    for results in spawn(_ring_calls_in_backward, 2, str(tmp_path)):
        assert [results[m]["calls"] for m in ("none", "selective", "full")] == [0, 0, 4]
        for mode in ("selective", "full"):
            assert results[mode]["grads"] == pytest.approx(results["none"]["grads"], rel=1e-5, abs=1e-7)
