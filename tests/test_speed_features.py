"""Activation checkpointing, Float8 (emulated) and compile change speed and memory, not the math."""

import dataclasses
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytitan.config.job import ConfigError, Float8, JobConfig
from raytitan.components.loss import cross_entropy_sum
from raytitan.components.metrics import MetricsLogger, mfu_percent, peak_tflops
from raytitan.models.llama3.args import FLAVORS, ModelArgs
from raytitan.models.llama3.model import Transformer, count_params, flops_per_token
from raytitan.distributed.activation_checkpoint import apply_activation_checkpointing
from raytitan.components.loss import build_loss
from raytitan.distributed.compile import compile_blocks
from raytitan.distributed.float8 import Float8HardwareError, check_hardware, convert_to_float8
from raytitan.config.plan import check_speed_features

ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=32)


def model(args=ARGS) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    return m


def tokens(seed=1, batch=4, seq=33):
    return torch.randint(0, ARGS.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_of(m, batch, loss_fn=cross_entropy_sum):
    return loss_fn(m(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].numel()


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class CountOps(TorchDispatchMode):
    def __init__(self, ops=MATMULS):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


AC_MODES = [("full", "op"), ("selective", "op"), ("selective", "2")]


@pytest.mark.parametrize("mode, option", AC_MODES)
def test_activation_checkpointing_keeps_gradients_and_names(mode, option):
    plain, checkpointed = model(), model()
    apply_activation_checkpointing(checkpointed, mode, option)
    batch = tokens()
    loss_of(plain, batch).backward()
    loss_of(checkpointed, batch).backward()
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_each_mode_recomputes_what_it_promises():
    """Matmuls run in backward: full recomputes every block's forward matmuls, selective 'op'
    keeps them (recomputing only cheap ops), every-2nd-block recomputes half the blocks'."""
    def backward_matmuls(mode, option="op"):
        m = model()
        apply_activation_checkpointing(m, mode, option)
        loss = loss_of(m, tokens())
        with CountOps() as counter:
            loss.backward()
        return counter.count

    none = backward_matmuls("none")
    assert none == 2 * (ARGS.n_layers * 7 + 1)  # grad input + grad weight of every linear
    # Recomputed per block: q, k, v, o, w1, w3; not w2, whose output nothing in backward needs
    # (recomputation stops once every saved tensor is back).
    per_block = 6
    assert backward_matmuls("full") == none + ARGS.n_layers * per_block
    assert backward_matmuls("selective", "op") == none
    assert backward_matmuls("selective", "2") == none + ARGS.n_layers // 2 * per_block


def float8_settings(**kwargs) -> Float8:
    return Float8(**{"emulate": True, **kwargs})


def test_float8_filters_choose_the_converted_layers():
    m = model()
    converted = convert_to_float8(m, float8_settings())
    linears = [n for n, mod in model().named_modules() if isinstance(mod, torch.nn.Linear)]
    assert converted == sorted(n for n in linears if n != "output")  # filter_fqns = ["output"] by default
    assert m.state_dict().keys() == model().state_dict().keys()
    converted = convert_to_float8(model(), float8_settings(filter_fqns=["output", "feed_forward"]))
    assert converted and not [n for n in converted if "feed_forward" in n]
    # torchao's size rule (H100 measurements): below K 4096 / N 1024 float8 does not pay.
    with torch.device("meta"):
        mixed = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(4096, 2048), torch.nn.Linear(4096, 512))
    assert convert_to_float8(mixed, float8_settings(auto_filter_small_kn=True, filter_fqns=[])) == ["1"]


def float8_losses(float8: bool, bf16: bool, steps: int = 6) -> list[float]:
    """Losses of the debug model over a few AdamW steps, with emulated Float8 linears or not,
    under bf16 autocast (as on one rank) or in float32."""
    m = model(FLAVORS["debugmodel"].with_vocab(97))
    if float8:
        convert_to_float8(m, float8_settings())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(m, tokens(seed=step % 2, seq=65))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # real processes / many training steps: seconds each
def test_float8_emulated_training_tracks_float32():
    """Float8 (e4m3 forward, e5m2 gradients) keeps about 2-3 significant digits per matmul: over
    6 AdamW steps the loss falls and stays within 1% of the float32 run."""
    float32, f8 = float8_losses(float8=False, bf16=False), float8_losses(float8=True, bf16=False)
    assert f8[-1] < f8[0] - 0.5
    for a, b in zip(float32, f8):
        assert abs(a - b) / a < 0.01, (float32, f8)


@pytest.mark.slow  # real processes / many training steps: seconds each
def test_float8_emulated_training_tracks_bf16():
    """Float8 replaces bf16 matmuls: under the same bf16 autocast, its losses over 6 steps stay
    within 1% of the bf16 run's (measured: 0.3% at most)."""
    bf16, f8 = float8_losses(float8=False, bf16=True), float8_losses(float8=True, bf16=True)
    assert f8 != bf16  # the float8 casts really changed the arithmetic
    assert f8[-1] < f8[0] - 0.5
    for a, b in zip(bf16, f8):
        assert abs(a - b) / a < 0.01, (bf16, f8)


def test_float8_auto_filter_with_filter_fqns_on_the_llama_model():
    """The real model's layer names and shapes (Llama 3.2 1B, two blocks, on the meta device):
    ``filter_fqns`` keeps w3 and the output head, torchao's size rule keeps the small ones."""
    from torchao.float8.float8_linear import Float8Linear

    settings = {"auto_filter_small_kn": True, "filter_fqns": ["output", "w3"]}
    # Tensorwise converts unless K <= 4096 and N <= 1024 (N, K = out, in features). dim 2048,
    # kv projections 2048 -> 512, hidden 8192: wk and wv are small, the rest pay off.
    # Rowwise wants N > 2048, K > 1024 and not (N <= 4096 and K <= 2048): only w1 (2048 -> 8192).
    wanted = {"tensorwise": ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"),
              "rowwise": ("feed_forward.w1",)}
    for recipe, layers in wanted.items():
        with torch.device("meta"):
            m = Transformer(dataclasses.replace(FLAVORS["1B"], n_layers=2, max_seq_len=16))
        converted = convert_to_float8(m, float8_settings(recipe_name=recipe, **settings))
        assert converted == sorted(f"layers.{i}.{name}" for i in range(2) for name in layers), recipe
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear):
                assert isinstance(mod, Float8Linear) == (name in converted), (recipe, name)
    # The debug model is small everywhere: nothing converts, and it still trains.
    m = model(FLAVORS["debugmodel"].with_vocab(97))
    assert convert_to_float8(m, float8_settings(**settings)) == []
    assert all(type(mod) is torch.nn.Linear for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    loss_of(m, tokens()).backward()


def test_float8_settings_that_torchao_cannot_build_are_refused_before_launch():
    config = JobConfig()
    config.model.converters = ["float8"]
    config.float8.auto_filter_small_kn = True
    for recipe in ("tensorwise", "rowwise"):
        config.float8.recipe_name = recipe
        check_speed_features(config)
    config.float8.recipe_name = "rowwise_with_gw_hp"
    with pytest.raises(ConfigError, match="auto_filter_small_kn.*rowwise_with_gw_hp"):
        check_speed_features(config)
    with pytest.raises(ValueError, match="auto_filter_small_kn"):  # and at conversion, should preflight be skipped
        convert_to_float8(model(), float8_settings(recipe_name="rowwise_with_gw_hp", auto_filter_small_kn=True))


@pytest.mark.parametrize("capability, emulate, refused", [
    ((8, 0), False, True),  # A100
    ((7, 0), False, True),  # V100
    ((8, 6), False, True),  # A10, RTX 30xx
    ((8, 0), True, False),  # emulation runs anywhere
    ((8, 9), False, False),  # L4, RTX 40xx
    ((9, 0), False, False),  # H100, H200
    ((10, 0), False, False),  # B200
])
def test_float8_needs_sm89_on_cuda(monkeypatch, capability, emulate, refused):
    if refused:
        with pytest.raises(Float8HardwareError, match=f"{capability[0]}.{capability[1]}.*emulate"):
            check_hardware("cuda", capability, emulate)
    else:
        check_hardware("cuda", capability, emulate)
    check_hardware("cpu", None, emulate)  # CPUs keep torch's own float8 matmul
    # Conversion (on the worker, where the GPU is) asks the current device when the mesh is CUDA's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def meta_model():
        with torch.device("meta"):
            return Transformer(ARGS)

    settings = float8_settings(emulate=emulate)
    if not refused:
        assert convert_to_float8(meta_model(), settings, device_type="cuda")
        return
    with pytest.raises(Float8HardwareError):
        convert_to_float8(meta_model(), settings, device_type="cuda")
    assert convert_to_float8(meta_model(), settings, device_type="cpu")


def test_selective_op_keeps_float8_amax():
    """Tensorwise Float8 computes max(abs(x)) of every linear input and weight: a pass over the
    tensor whose result is one number. The per-op policy saves it, so backward runs no more max
    than without checkpointing (only the gradients' own), and the gradients are unchanged."""
    def backward_maxes(mode):
        m = model()
        convert_to_float8(m, float8_settings())
        apply_activation_checkpointing(m, mode, "op")
        loss = loss_of(m, tokens())
        with CountOps((torch.ops.aten.max.default,)) as counter:
            loss.backward()
        return counter.count, [p.grad for p in m.parameters()]

    (none, plain), (op, checkpointed), (full, _) = (backward_maxes(mode) for mode in ("none", "selective", "full"))
    assert none > 0 and op == none < full
    for p, q in zip(plain, checkpointed):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_blocks_and_loss_match_eager():
    eager, compiled = model(), model()
    apply_activation_checkpointing(compiled, "selective", "op")  # compile traces through checkpointing too
    compile_blocks(compiled)
    compiled_loss = build_loss(True)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    for step in range(3):
        batch = tokens(seed=step)
        losses = []
        for m, opt, fn in ((eager, opts[0], cross_entropy_sum), (compiled, opts[1], compiled_loss)):
            opt.zero_grad()
            loss = loss_of(m, batch, fn)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) / losses[0] < 1e-5, (step, losses)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_mfu_of_the_published_8b_throughput(monkeypatch):
    """Llama 3.1 8B at seq 8192: 5,762 tokens/s per H100 (a published FSDP-on-8-GPUs figure) is
    5,762 x 57.9 GFLOP / 989 TFLOP/s = 33.7% MFU, inside the 33-39% quoted with it."""
    args = FLAVORS["8B"]
    with torch.device("meta"):
        n, emb = count_params(Transformer(dataclasses.replace(args, max_seq_len=16)))
    fpt = flops_per_token(args, n, emb, 8192)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = peak_tflops(torch.device("cuda", 0))
    assert peak == 989.0
    assert round(mfu_percent(fpt, 5762, peak), 1) == 33.7


def test_8b_flops_per_token_by_hand():
    """Llama 3.1 8B at seq 8192 from its published shapes: 6 x N + 12 x L x H x Q x T, N the
    non-embedding parameters (the untied output head counts, the token embedding does not)."""
    dim, layers, heads, kv_heads, head_dim, ffn, vocab, seq = 4096, 32, 32, 8, 128, 14336, 128256, 8192
    attention = dim * heads * head_dim + 2 * dim * kv_heads * head_dim + heads * head_dim * dim  # wq, wk, wv, wo
    mlp = 3 * dim * ffn  # w1, w2, w3
    norms = 2 * dim
    n = layers * (attention + mlp + norms) + dim + dim * vocab  # blocks, final norm, output head
    expected = 6 * n + 12 * layers * heads * head_dim * seq
    assert expected == 57_914_449_920
    args = FLAVORS["8B"]
    with torch.device("meta"):
        params, embedding = count_params(Transformer(dataclasses.replace(args, max_seq_len=16)))
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.head_dim, args.ffn_hidden_dim,
            args.vocab_size) == (dim, layers, heads, kv_heads, head_dim, ffn, vocab)
    assert flops_per_token(args, params, embedding, seq) == expected


def test_cuda_peak_memory_is_per_log_window(monkeypatch):
    """Each report gives the peak since the previous one: a large step early in the run does not
    hide in every later window."""
    allocator = {"active_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 4 * 2**30}
    current = {"active_bytes.all.peak": 1 * 2**30, "reserved_bytes.all.peak": 4 * 2**30}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(allocator))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(current))
    metrics = MetricsLogger(torch.device("cuda", 0), 1000, world_size=1, peak_override=1.0, tb_folder=None, rank=0)
    first, second = (metrics.summarize(step, 1.0, 1.0, 1e-3) for step in (1, 2))
    assert (first["memory/max_active_gib"], second["memory/max_active_gib"]) == (3.0, 1.0)
    assert second["memory/max_reserved_gib"] == 4.0

    def no_reset(device=None):
        raise AssertionError("no CUDA peak to reset on CPU")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", no_reset)
    assert MetricsLogger(torch.device("cpu"), 1000, 1, 0.0, None, 0).summarize(1, 1.0, 1.0, 1e-3)["memory/max_rss_gib"] > 0


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA B200", 2250.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L4", None)])
def test_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == peak
    assert peak_tflops(torch.device("cuda", 0), override=123.0) == 123.0
    assert peak_tflops(torch.device("cpu")) is None


def test_bf16_autocast_without_fsdp_keeps_float32_weights():
    """One rank (no FSDP to cast parameters): training.mixed_precision_param = bfloat16 computes
    under autocast; the weights and their gradients stay float32."""
    from raytitan.trainer.runner import ModelRunner

    batch = tokens()
    losses = {}
    for dtype in (None, torch.bfloat16):
        m = model()
        seen = []
        m.layers["0"].attention.wq.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        runner = ModelRunner([m], autocast_dtype=dtype)
        losses[dtype] = runner.forward_backward(batch[:, :-1], batch[:, 1:], batch[:, 1:].numel()).item()
        assert seen == [dtype or torch.float32]
        assert {p.dtype for p in m.parameters()} == {p.grad.dtype for p in m.parameters()} == {torch.float32}
    assert losses[None] != losses[torch.bfloat16] and abs(losses[None] - losses[torch.bfloat16]) < 0.01


def profiled_steps(folder, first: int, last: int) -> list[str]:
    """Train steps first..last under a profiler with profile_freq 3; the trace folders written."""
    from raytitan.config.job import Profiling
    from raytitan.components.profiling import Profiler

    m = model()
    profiler = Profiler(Profiling(enable_profiling=True, profile_freq=3), str(folder), rank=0,
                        device=torch.device("cpu"), first_step=first)
    for step in range(first, last + 1):
        loss_of(m, tokens()).backward()
        profiler.step(step)
    profiler.close()
    return sorted(os.listdir(folder / "profile_traces"))


def test_profiler_traces_the_last_step_of_every_period(tmp_path):
    import json

    assert profiled_steps(tmp_path, 1, 6) == ["iteration_3", "iteration_6"]
    with open(tmp_path / "profile_traces" / "iteration_6" / "rank0_trace.json") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert "aten::mm" in names


def test_profiler_keeps_its_grid_after_a_resume(tmp_path):
    """A run resumed at step 5 traces steps 6 and 9 (multiples of profile_freq), as the
    uninterrupted run would, and no half-set-up trace when it stops before step 12."""
    assert profiled_steps(tmp_path, 5, 11) == ["iteration_6", "iteration_9"]
