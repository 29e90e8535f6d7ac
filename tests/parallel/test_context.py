"""Context-parallel attention equals full causal attention, forward and backward."""

import pytest
import torch

from raytitan.models.llama3.model import CausalAttention
from raytitan.parallel.context import load_balanced_positions, shard_sequence

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


def _compare(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from raytitan.parallel.context import ContextParallelAttention

    torch.manual_seed(0)
    seq = 8 * world
    q, k, v = (torch.randn(2, heads, seq, 8, dtype=torch.float64, requires_grad=True) for heads in (4, 2, 2))
    grad_out = torch.randn(2, 4, seq, 8, dtype=torch.float64)
    full = CausalAttention()(q, k, v)
    (full * grad_out).sum().backward()

    positions = load_balanced_positions(seq, world, rank)
    all_positions = torch.cat([load_balanced_positions(seq, world, r) for r in range(world)])
    local = [shard_sequence(t.detach(), positions, dim=2).requires_grad_() for t in (q, k, v)]
    out = ContextParallelAttention(dist.group.WORLD, positions, all_positions)(*local)
    (out * shard_sequence(grad_out, positions, dim=2)).sum().backward()

    def diff(a, b):
        return (a - shard_sequence(b, positions, dim=2)).abs().max().item()

    return {"out": diff(out, full), **{n: diff(t.grad, f.grad) for n, t, f in zip("qkv", local, (q, k, v))}}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_equals_full_attention(tmp_path, world):
    for rank, diffs in enumerate(spawn(_compare, world, str(tmp_path))):
        assert max(diffs.values()) < 1e-12, (rank, diffs)
