"""The MoE layer: grouped matmul equals the per-expert loop, routing equals a naive reference,
the load-balancing bias chooses experts without weighting them and moves load toward uniform,
shared experts, a tiny MoE that learns, parameter counts (total and activated), and the expert-load
metrics with their routing-collapse warning."""

import dataclasses
import logging

import pytest
import torch

from raytitan.models.moe import (
    COLLAPSE_LOGGED_STEPS, GroupedExperts, MoE, MoEArgs, TokenChoiceRouter, activated_params, aux_loss,
    collapse_threshold, grouped_mm, moe_metrics, moe_param_counts, update_load_balance_bias,
)

ARGS = MoEArgs(dim=8, moe_inter_dim=16, num_experts=4, top_k=2, num_shared_experts=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Shapes this small gain nothing from threads, and on a busy machine the many tiny
    parallel regions of a training loop wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(args=ARGS, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(args)
    moe.init_weights(0.02)
    with torch.no_grad():  # larger weights than at init, so differences show
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


def naive_route(scores, bias, args):
    """Per token, in Python: the groups, then the experts, then the weights."""
    ids, weights = [], []
    per_group = args.num_experts // args.n_expert_groups
    for s in scores.tolist():
        choice = [v + (bias[i] if bias is not None else 0.0) for i, v in enumerate(s)]
        allowed = range(args.num_experts)
        if args.n_expert_groups > 1:
            group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group])[-2:]) for g in range(args.n_expert_groups)]
            best = sorted(range(args.n_expert_groups), key=lambda g: -group_score[g])[:args.n_limited_groups]
            allowed = [e for e in allowed if e // per_group in best]
        top = sorted(allowed, key=lambda e: -choice[e])[:args.top_k]
        w = [s[e] for e in top]
        if args.route_norm:
            w = [v / sum(w) for v in w]
        ids.append(top)
        weights.append([v * args.route_scale for v in w])
    return torch.tensor(ids), torch.tensor(weights)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("route_norm", [False, True])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_routing_equals_a_naive_reference(score_func, route_norm, groups):
    args = MoEArgs(dim=8, moe_inter_dim=16, num_experts=8, top_k=3, score_func=score_func, route_norm=route_norm,
                   route_scale=2.5, n_expert_groups=groups[0], n_limited_groups=groups[1])
    torch.manual_seed(1)
    router = TokenChoiceRouter(args)
    router.init_weights(0.5)
    router.expert_bias.copy_(0.1 * torch.randn(8))
    x = torch.randn(32, 8)
    weights, ids, counts, scores = router(x)
    want_ids, want_weights = naive_route(scores, router.expert_bias.tolist(), args)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)
    assert torch.equal(counts, torch.bincount(want_ids.flatten(), minlength=8))
    if groups[0] > 1:  # every token's experts lie in at most n_limited_groups groups
        assert all(len(set((row // 2).tolist())) <= 2 for row in ids)


def test_the_bias_changes_which_experts_not_their_weights():
    args = dataclasses.replace(ARGS, num_experts=8, top_k=2, score_func="sigmoid")
    torch.manual_seed(2)
    router = TokenChoiceRouter(args)
    router.init_weights(0.5)
    x = torch.randn(16, 8)
    _, ids0, _, scores = router(x)
    router.expert_bias[3] = 10.0  # expert 3 is chosen by every token...
    weights, ids, _, _ = router(x)
    assert (ids == 3).any(dim=-1).all() and not torch.equal(ids, ids0)
    # ...but weighted by its score alone, the bias left out.
    torch.testing.assert_close(weights, scores.gather(-1, ids))
    assert weights.max() < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_runs_on_cpu(dtype):
    """torch._grouped_mm (private) as grouped_mm calls it: 2-D rows by 3-D weights, an empty group."""
    x, w = torch.randn(5, 8, dtype=dtype), torch.randn(3, 8, 16, dtype=dtype)
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    want = torch.cat([x[:2].float() @ w[0].float(), x[2:].float() @ w[2].float()])
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    w.requires_grad_()
    out = grouped_mm(x, w, offsets)
    torch.testing.assert_close(out.float(), want, **tol)
    out.backward(torch.randn_like(out))
    assert torch.all(w.grad[1] == 0)  # the empty group's gradient is zeros, not stale memory


def test_grouped_matmul_equals_the_per_expert_loop_forward_and_backward():
    grouped = build()
    loop = build()
    loop.experts.use_grouped_mm = False
    x = torch.randn(2, 6, 8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(t) for m, t in zip((grouped, loop), xs)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(grouped.named_parameters(), loop.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=name)
    # an expert nobody chose gets a zero gradient on both paths
    idle = (grouped.tokens_per_expert == 0).nonzero().flatten()
    assert all(grouped.experts.w1.grad[e].abs().sum() == 0 for e in idle)
    # a plain sum backward (its gradient is an expanded, stride-0 tensor) works too
    grouped(x).sum().backward()


def test_output_is_shared_plus_weighted_chosen_experts():
    moe = build()
    x = torch.randn(1, 5, 8)
    out = moe(x)
    flat = x.view(-1, 8)
    weights, ids, _, _ = moe.router(flat)
    e = moe.experts
    for t in range(5):
        want = moe.shared_experts(flat[t])
        for k in range(2):
            i = ids[t, k]
            h = torch.nn.functional.silu(e.w1[i] @ flat[t]) * (e.w3[i] @ flat[t])
            want = want + weights[t, k] * (e.w2[i] @ h)
        torch.testing.assert_close(out[0, t], want, rtol=1e-5, atol=1e-5)
    assert moe.shared_experts.w1.weight.shape == (16, 8)  # num_shared_experts x moe_inter_dim


def test_the_bias_update_balances_a_skewed_router_and_is_saved():
    args = dataclasses.replace(ARGS, num_experts=4, top_k=1, load_balance_coeff=0.02)
    moe = build(args)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1)
        moe.router.gate.weight[0, 0] += 5  # a constant feature below makes expert 0 the favourite
    torch.manual_seed(3)
    x = torch.randn(4, 16, 8)
    x[..., 0] = 1
    moe(x)
    moe(x)  # two microbatches, counted together
    before = moe.tokens_per_expert / 2
    assert before.max() > 2 * before.mean() and before.min() <= 2
    loads = []
    for _ in range(40):
        update_load_balance_bias(moe)
        assert moe.tokens_per_expert.sum() == 0
        moe(x)
        loads.append(moe.tokens_per_expert.clone())
    # A fixed-size step oscillates around balance: the recent average is near uniform (16).
    recent = torch.stack(loads[-10:]).mean(dim=0)
    assert recent.max() < 0.7 * before.max() and recent.min() > 3 * before.min()
    assert moe.router.expert_bias.requires_grad is False
    assert abs(moe.router.expert_bias.sum()) < 1e-5  # centred
    # the bias is in the state dict (and the transient counts are not)
    state = moe.state_dict()
    assert "router.expert_bias" in state and "tokens_per_expert" not in state
    other = MoE(args)
    other.load_state_dict(state)
    assert torch.equal(other.router.expert_bias, moe.router.expert_bias)
    assert "router.expert_bias" not in MoE(dataclasses.replace(args, load_balance_coeff=None)).state_dict()


def test_sequence_aux_loss_is_kept_for_the_trainer_and_reaches_the_gate():
    args = dataclasses.replace(ARGS, aux_loss_alpha=0.01)
    moe = build(args)
    moe(torch.randn(2, 6, 8))
    loss = aux_loss(moe)
    assert loss.ndim == 0 and loss > 0 and aux_loss(moe) is None
    loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    moe.eval()
    moe(torch.randn(2, 6, 8))
    assert aux_loss(moe) is None
    # uniform routing scores the minimum, alpha x 1
    from raytitan.models.moe import sequence_aux_loss

    ids = torch.arange(4).repeat(3).view(1, 6, 2)
    assert abs(sequence_aux_loss(torch.full((1, 6, 4), 0.25), ids, 2, 0.01).item() - 0.01) < 1e-7


def test_a_tiny_moe_learns_a_regression():
    """Plain gradient descent by hand (a torch optimizer's first step costs about a second of
    one-time setup), updating the balancing bias after every step as the trainer will."""
    moe = build()
    torch.manual_seed(0)
    x = torch.randn(4, 8, 8)
    y = torch.tanh(x @ torch.randn(8, 8))
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(moe(x), y)
        moe.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in moe.parameters():
                p -= 0.05 * p.grad
        update_load_balance_bias(moe)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert moe.router.expert_bias.abs().sum() > 0  # the bias moved as it trained


def test_init_is_deterministic_from_the_seed():
    a, b = (MoE(ARGS) for _ in range(2))
    for m in (a, b):
        torch.manual_seed(7)
        m.init_weights(0.02)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.router.expert_bias.abs().sum() == 0
    # built on meta, materialized, then initialized (as raytitan builds models): the same weights
    with torch.device("meta"):
        c = MoE(ARGS)
    c.to_empty(device="cpu")
    torch.manual_seed(7)
    c.init_weights(0.02)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    assert torch.equal(c.tokens_per_expert, torch.zeros(4))


def test_the_update_sums_counts_over_the_data_parallel_group():
    """One rank here: the counts go through the all-reduce and the bias moves as without it."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    a, b = build(), build()
    x = torch.randn(2, 6, 8)
    a(x), b(x)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        update_load_balance_bias(a, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    update_load_balance_bias(b)
    assert torch.equal(a.router.expert_bias, b.router.expert_bias) and a.router.expert_bias.abs().sum() > 0


def test_parameter_counts_total_and_activated():
    moe = MoE(ARGS)
    expert = 3 * 8 * 16
    total, active = moe_param_counts(ARGS)
    assert total == sum(p.numel() for p in moe.parameters()) == 8 * 4 + expert + 4 * expert
    assert active == 8 * 4 + expert + 2 * expert  # router + shared + top_k routed
    model = torch.nn.ModuleDict({"moe": moe, "other": torch.nn.Linear(8, 8, bias=False)})
    assert activated_params(model) == (total + 64, active + 64)
    # DeepSeek-V3 671B's MoE layer: 256 routed experts of 2048, 1 shared, 8 active, dim 7168
    big = MoEArgs(dim=7168, moe_inter_dim=2048, num_experts=256, top_k=8, num_shared_experts=1)
    assert moe_param_counts(big) == (7168 * 256 + 257 * 3 * 7168 * 2048, 7168 * 256 + 9 * 3 * 7168 * 2048)


def test_args_are_checked():
    with pytest.raises(ValueError, match="multiples of 8"):
        MoEArgs(dim=6, moe_inter_dim=16)
    MoEArgs(dim=6, moe_inter_dim=16, use_grouped_mm=False)
    with pytest.raises(ValueError, match="score_func"):
        MoEArgs(dim=8, moe_inter_dim=16, score_func="relu")
    with pytest.raises(ValueError, match="n_limited_groups"):
        MoEArgs(dim=8, moe_inter_dim=16, num_experts=8, top_k=4, n_expert_groups=4, n_limited_groups=1)
    with pytest.raises(ValueError, match="top_k"):
        MoEArgs(dim=8, moe_inter_dim=16, num_experts=4, top_k=5)


def test_grouped_experts_accept_bfloat16():
    experts = GroupedExperts(8, 16, 3).to(torch.bfloat16)
    torch.nn.init.normal_(experts.w1)
    torch.nn.init.normal_(experts.w2)
    torch.nn.init.normal_(experts.w3)
    x = torch.randn(7, 8, dtype=torch.bfloat16)
    counts = torch.tensor([3, 0, 4])
    out = experts(x, counts)
    experts.use_grouped_mm = False
    torch.testing.assert_close(out, experts(x, counts), rtol=2e-2, atol=5e-2)


def in_block(moe: MoE, index: int) -> torch.nn.Module:
    """``moe`` where a family keeps it: ``layers.<index>.moe``."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleDict({str(index): torch.nn.ModuleDict({"moe": moe})})
    return model


def test_expert_load_metrics_of_a_skewed_router():
    moe = build()  # 4 experts, top 2
    model = in_block(moe, 5)
    with torch.no_grad():
        moe.router.expert_bias[3] = 10.0  # every token chooses expert 3, and one other
    assert moe_metrics([model]) == {}  # nothing counted yet
    x = torch.randn(2, 6, 8)
    for _ in range(2):  # two optimizer steps between logs: both counted
        moe(x), moe(x)
        update_load_balance_bias(model)
    m = moe_metrics([model])
    # expert 3 has all 48 tokens, the others 48 together: mean 24 per expert
    assert m["moe/layer_5/max_over_mean"] == pytest.approx(2.0)
    assert m["moe/layer_5/busiest_share"] == pytest.approx(1.0)
    bias = moe.router.expert_bias
    assert (m["moe/layer_5/bias_min"], m["moe/layer_5/bias_max"]) == (bias.min().item(), bias.max().item())
    assert 9.99 < bias.max() < 10  # the updates lowered the favourite's bias (after the counts it saw)
    assert {k: m[k] for k in ("moe/max_over_mean", "moe/busiest_share", "moe/worst_layer", "moe/bias_max")} == {
        "moe/max_over_mean": m["moe/layer_5/max_over_mean"], "moe/busiest_share": 1.0, "moe/worst_layer": 5.0,
        "moe/bias_max": bias.max().item()}
    assert moe_metrics([model]) == {}  # counted since the last log only
    # a balanced layer: max/mean 1, the busiest expert has top_k / num_experts of the tokens
    moe.update_expert_bias(torch.full((4,), 6.0))
    m = moe_metrics([model])
    assert m["moe/layer_5/max_over_mean"] == 1.0 and m["moe/layer_5/busiest_share"] == 0.5
    # the log line shows the summary only
    from raytitan.components.metrics import moe_summary

    assert moe_summary(m) == "  moe max/mean 1.00 (layer 5) busiest 50%" and moe_summary({}) == ""


def test_routing_collapse_is_warned_once_after_consecutive_logged_steps(caplog):
    assert collapse_threshold(2, 4) == 0.75 and collapse_threshold(2, 8) == 0.625
    assert collapse_threshold(8, 128) == pytest.approx(0.53125) and collapse_threshold(4, 4) is None
    moe = build()  # 4 experts, top 2: warned above 75% of the tokens on one expert
    model = in_block(moe, 2)
    collapsed, fine = torch.tensor([2.0, 9.0, 4.0, 5.0]), torch.tensor([2.0, 7.0, 4.0, 7.0])  # 90%, 70%

    def log_step(counts):
        moe.update_expert_bias(counts)
        return moe_metrics([model])

    with caplog.at_level(logging.WARNING, logger="raytitan"):
        for counts in [collapsed] * (COLLAPSE_LOGGED_STEPS - 1) + [fine] + [collapsed] * (COLLAPSE_LOGGED_STEPS - 1):
            assert log_step(counts)["moe/layer_2/busiest_share"] in (pytest.approx(0.9), pytest.approx(0.7))
        assert not caplog.records  # a step below the threshold restarted the count
        log_step(collapsed)
        (record,) = caplog.records
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert "layer 2" in message and "expert 1" in message and "90%" in message and "load_balance_coeff" in message
        for _ in range(COLLAPSE_LOGGED_STEPS + 1):
            log_step(collapsed)
        assert len(caplog.records) == 1  # once per layer


def test_a_dense_model_has_no_moe_metrics():
    from raytitan.models import get_spec

    llama = get_spec("llama3")
    assert llama.metrics is None  # the trainer merges nothing
    args = dataclasses.replace(llama.flavor("debugmodel").with_vocab(256), n_layers=2, max_seq_len=64)
    assert moe_metrics([llama.build(args)]) == {}
    assert get_spec("qwen3_moe").metrics is moe_metrics and get_spec("deepseek_v3").metrics is moe_metrics
