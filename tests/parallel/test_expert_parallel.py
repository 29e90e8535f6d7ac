"""Expert parallel (raytitan/distributed/expert_parallel.py) trains Qwen3-MoE like one process:
EP 2 and EP 4 on 4 gloo ranks give one process's first 5 losses from the same seed weights, and
so do its compositions with HSDP, pipeline parallel, tensor parallel and torch.compile; expert
weights saved under one expert-parallel degree load under another (DCP resharding on the
expert dimension) and train on with the uninterrupted run's losses. Config errors and the
elastic re-planning of the degree are checked before any worker starts (quick)."""

import json
import os
import shutil

import pytest

from raytitan.components.metrics import read_metrics
from raytitan.config.job import ConfigError, JobConfig
from raytitan.config.plan import elastic_layout, plan_run
from tests.helpers import RaytitanLog, run_ranks, tiny_config

STEPS = 5
MOE = {"name": "qwen3_moe", "flavor": "debugmodel"}


def plan_config(**parallelism) -> JobConfig:
    config = JobConfig()
    config.model.name, config.model.flavor = "qwen3_moe", "debugmodel"
    config.training.dataset = "synthetic"
    for key, value in parallelism.items():
        setattr(config.parallelism, key, value)
    return config


# --------------------------------------------------------------------------- before launch (quick)


def test_expert_parallel_plans_over_the_data_parallel_shard_ranks():
    dims = plan_run(plan_config(expert_parallel_degree=2), 4, resolve_data=False).dims
    assert (dims.dp_shard, dims.ep, dims.efsdp, dims.dp) == (4, 2, 2, 4)
    hsdp = plan_run(plan_config(expert_parallel_degree=2, data_parallel_replicate_degree=2), 4,
                    resolve_data=False).dims
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.ep, hsdp.efsdp) == (2, 2, 2, 1)
    # Pipeline and tensor parallel take their ranks first; expert parallel borrows from what is left.
    pp = plan_run(plan_config(expert_parallel_degree=2, pipeline_parallel_degree=2), 4, resolve_data=False).dims
    assert (pp.pp, pp.dp_shard, pp.ep, pp.efsdp) == (2, 2, 2, 1)
    tp = plan_run(plan_config(expert_parallel_degree=2, tensor_parallel_degree=2), 8, resolve_data=False).dims
    assert (tp.tp, tp.dp_shard, tp.ep, tp.efsdp) == (2, 4, 2, 2)


@pytest.mark.parametrize("world, parallelism, message", [
    (4, {"expert_parallel_degree": 3}, r"expert_parallel_degree = 3 does not divide the data-parallel shard degree 4"),
    (6, {"expert_parallel_degree": 3}, r"expert_parallel_degree = 3 does not divide the 8 experts"),
    (4, {"expert_parallel_degree": 2, "tensor_parallel_degree": 2, "pipeline_parallel_degree": 2},
     r"expert_parallel_degree = 2 does not divide the data-parallel shard degree 1"),
    (4, {"expert_parallel_degree": 2, "context_parallel_degree": 2},
     r"expert_parallel_degree = 2 does not combine with parallelism.context_parallel_degree = 2 .*set "
     r"parallelism.expert_parallel_degree = 1, or parallelism.context_parallel_degree = 1"),
])
def test_layouts_expert_parallel_cannot_split_are_config_errors(world, parallelism, message):
    with pytest.raises(ConfigError, match=message):
        plan_run(plan_config(**parallelism), world, resolve_data=False)


def test_expert_parallel_on_a_dense_model_or_with_per_op_checkpointing_is_a_config_error():
    dense = plan_config(expert_parallel_degree=2)
    dense.model.name, dense.model.flavor = "llama3", "debugmodel"
    with pytest.raises(ConfigError, match=r"needs a Mixture-of-Experts model; model.name = 'llama3'"):
        plan_run(dense, 2, resolve_data=False)
    compiled = plan_config(expert_parallel_degree=2)
    compiled.compile.enable = True  # the experts and the all-to-all stay eager: plans
    assert plan_run(compiled, 2, resolve_data=False).dims.ep == 2
    per_op = plan_config(expert_parallel_degree=2)
    per_op.activation_checkpoint.mode = "selective"
    with pytest.raises(ConfigError, match=r"does not combine with per-op activation checkpointing"):
        plan_run(per_op, 2, resolve_data=False)
    per_op.activation_checkpoint.selective_ac_option = "2"  # every 2nd block fully: works
    assert plan_run(per_op, 2, resolve_data=False).dims.ep == 2


def test_deepseek_v3_plans_tensor_parallel_with_or_without_expert_parallel():
    """DeepSeek-V3's latent attention splits by heads: TP plans alone and with EP; a degree that
    does not divide the heads is refused before launch."""
    config = plan_config(expert_parallel_degree=2, tensor_parallel_degree=2)
    config.model.name = "deepseek_v3"
    dims = plan_run(config, 4, resolve_data=False).dims
    assert (dims.tp, dims.ep) == (2, 2)
    config.parallelism.expert_parallel_degree = 1
    assert plan_run(config, 2, resolve_data=False).dims.tp == 2
    config.parallelism.tensor_parallel_degree = 3  # 8 heads
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree 3 does not divide the model's n_heads \(8\)"):
        plan_run(config, 3, resolve_data=False)


def test_elastic_worlds_re_plan_expert_parallel_like_data_parallel():
    config = plan_config(expert_parallel_degree=4)
    config.ray.min_workers, config.training.global_batch_size = 1, 12
    dims, local = elastic_layout(config, 4, 12)
    assert (dims.dp_shard, dims.ep, local) == (4, 4, 3)
    with RaytitanLog() as log:
        dims, local = elastic_layout(config, 3, 12)  # 3 ranks: no divisor of 8 experts but 1
    assert (dims.dp_shard, dims.ep, dims.dp * local) == (3, 1, 12)
    assert any("training with expert parallel 1" in m for m in log.messages("INFO"))
    dims, _ = elastic_layout(config, 2, 12)
    assert (dims.dp_shard, dims.ep) == (2, 2)


def test_moe_experts_declare_the_weights_expert_parallel_splits():
    """Expert parallel finds what to split by the ``expert_parallel_weights`` a module declares
    (raytitan.distributed knows no model family): every MoE layer's experts, nothing in a dense model."""
    import dataclasses

    from raytitan.distributed.expert_parallel import expert_modules
    from raytitan.models import get_spec
    from raytitan.models.spec import build_meta

    def meta(name):
        spec = get_spec(name)
        return build_meta(spec, dataclasses.replace(spec.flavor("debugmodel"), vocab_size=256))

    experts = expert_modules(meta("qwen3_moe"))
    assert len(experts) == 4 and all(m.w1.shape[0] == 8 for m in experts)
    assert type(experts[0]).expert_parallel_weights == ("w1", "w2", "w3")
    assert expert_modules(meta("llama3")) == []


def test_the_auxiliary_loss_under_tensor_or_pipeline_parallel_is_a_config_error_before_launch():
    """The sequence-wise auxiliary loss needs whole sequences per rank and the runner's own
    backward: refused at planning (not only when the workers build), naming both keys."""
    for parallelism, world in (({"tensor_parallel_degree": 2, "expert_parallel_degree": 2}, 4),
                               ({"pipeline_parallel_degree": 2, "expert_parallel_degree": 2}, 4)):
        config = plan_config(**parallelism)
        config.training.load_balance_loss_weight = 1e-3
        name = "tensor" if "tensor_parallel_degree" in parallelism else "pipeline"
        with pytest.raises(ConfigError, match=rf"training.load_balance_loss_weight = 0.001 does not combine with "
                                              rf"{name} parallel yet: .*parallelism.{name}_parallel_degree = 1"):
            plan_run(config, world, resolve_data=False)
    config = plan_config(expert_parallel_degree=2)
    config.training.load_balance_loss_weight = 1e-3
    assert plan_run(config, 2, resolve_data=False).dims.ep == 2


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_float8_converts_no_router_and_no_grouped_experts(name):
    """Float8 (torchao's Float8Linear) swaps nn.Linear layers only: an MoE family's conversion
    settings (its ``parallelize``'s ``float8_settings``) keep every router gate in high precision,
    and the grouped experts (stacked Parameters, not nn.Linear) are never converted; attention,
    dense feed-forwards and DeepSeek-V3's shared experts are. On the meta device, as a run
    converts before parallelizing."""
    import dataclasses

    import torch
    from torchao.float8.float8_linear import Float8Linear

    from raytitan.config.job import Float8
    from raytitan.distributed.float8 import convert_to_float8
    from raytitan.models import get_spec
    from raytitan.models.moe import GroupedExperts
    from raytitan.models.qwen3_moe.parallelize import float8_settings
    from raytitan.models.spec import build_meta

    spec = get_spec(name)
    model = build_meta(spec, dataclasses.replace(spec.flavor("debugmodel"), vocab_size=256))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    settings = float8_settings(Float8(emulate=True))
    assert settings.filter_fqns == ["output", "router.gate"]
    converted = convert_to_float8(model, settings)
    gates = {n for n in linears if n.endswith("router.gate")}
    assert len(gates) == sum(1 for m in model.modules() if isinstance(m, GroupedExperts)) > 0
    assert set(converted) == linears - gates - {"output"}
    assert all(isinstance(dict(model.named_modules())[n], Float8Linear) for n in converted)
    assert not any(isinstance(m, Float8Linear) for n, m in model.named_modules() if "router" in n)
    assert all(type(m) is GroupedExperts and type(m.w1) is torch.nn.Parameter
               for m in model.modules() if isinstance(m, GroupedExperts))
    if name == "deepseek_v3":
        assert any("shared_experts" in n for n in converted) and any("feed_forward" in n for n in converted)


# --------------------------------------------------------------------------- on 4 gloo ranks (slow)


def config(root, data_dir, name, parallelism=None, local_batch=2, ac="none", ray=None, **checkpoint):
    return tiny_config(str(root / name), data_dir, model=MOE, parallelism=parallelism or {},
                       training={"global_batch_size": 8, "local_batch_size": local_batch, "steps": STEPS},
                       checkpoint={"enable": False, **checkpoint}, activation_checkpoint={"mode": ac}, ray=ray or {})


def step_folder(root, name, step):
    return os.path.join(str(root / name), "run", "checkpoint", f"step-{step}")


# Expert parallel with pipeline parallel: 2 stages of 2 layers, 4 microbatches of 1 per step.
PIPELINE = {"pipeline_parallel_degree": 2, "pipeline_parallel_microbatch_size": 1,
            "pipeline_parallel_first_stage_less_layers": 0, "pipeline_parallel_last_stage_less_layers": 0}


def moe_metrics_logged(run_dir: str) -> list[dict]:
    """Per logged step, the expert-load metrics rank 0 logged (every layer's, from global counts)."""
    return [{k: v for k, v in m.items() if k.startswith("moe/")} for m in read_metrics(run_dir) if "loss" in m]


@pytest.mark.slow
def test_expert_parallel_trains_like_one_process_and_reshards_its_experts(tmp_path, data_dir):
    """From one seed checkpoint (saved by one process, loaded under every layout): one process
    gives the reference. On 4 ranks in one spawn, EP 2 and EP 4 (an elastic run; both save at
    step 3), HSDP 2 x 2 with EP 2, EP 2 x PP 2 and EP 2 x TP 2 reproduce its 5 losses (1e-4
    relative). On 2 ranks: the elastic EP 4 run, restarted after losing two workers, re-plans to
    EP 2 (local batch 2 x accumulation 2), and EP 2's step 3 from 4 ranks resumes with full
    activation checkpointing (the recomputed forward dispatches again) and compiled blocks (the
    experts and the all-to-all eager); both give the uninterrupted steps 4 and 5. TP 2 without
    data parallel gives the 5 reference losses.

    Under pipeline and tensor parallel the expert-load metrics rank 0 logs (every layer's, from
    the counts the bias update summed) are those of plain EP 2: every stage's layers reported, the
    counts of both tp ranks' sequence shards included (so the bias moved as one process's did).

    DeepSeek-V3 under tensor parallel, in the same spawns: ``check_deepseek_v3``."""
    seed = step_folder(tmp_path, "seed", 0)
    saving = {"enable": True, "interval": 3, "initial_load_path": seed}
    deepseek_one, deepseek_four = deepseek_v3_runs(tmp_path, data_dir)  # in the same spawns, checked after
    _, one, _, ds_one = run_ranks([config(tmp_path, data_dir, "seed", create_seed_checkpoint=True),
                                 config(tmp_path, data_dir, "one", local_batch=8, initial_load_path=seed),
                                 *deepseek_one], 1, str(tmp_path))
    elastic = config(tmp_path, data_dir, "elastic", {"expert_parallel_degree": 4},
                     ray={"min_workers": 2, "max_workers": 4}, **saving)
    layouts = {
        "ep2": config(tmp_path, data_dir, "ep2", {"expert_parallel_degree": 2}, **saving),
        "ep4": elastic,
        "hsdp": config(tmp_path, data_dir, "hsdp", {"expert_parallel_degree": 2, "data_parallel_replicate_degree": 2},
                       initial_load_path=seed),
        "ep2_pp2": config(tmp_path, data_dir, "ep2_pp2", {"expert_parallel_degree": 2, **PIPELINE}, local_batch=4,
                          initial_load_path=seed),
        "ep2_tp2": config(tmp_path, data_dir, "ep2_tp2", {"expert_parallel_degree": 2, "tensor_parallel_degree": 2},
                          local_batch=4, initial_load_path=seed),
    }
    *four, ds_ep2_tp2 = run_ranks([*layouts.values(), deepseek_four], 4, str(tmp_path))
    four = dict(zip(layouts, four))
    shutil.rmtree(step_folder(tmp_path, "elastic", 5))  # as if two workers died after step 3's save
    # Resumed with full activation checkpointing and compiled blocks (the experts and the
    # all-to-all eager, attention and router compiled): one run for both, compiling costs most.
    ep2_on_two = config(tmp_path, data_dir, "ep2_on_two", {"expert_parallel_degree": 2}, ac="full",
                        initial_load_path=step_folder(tmp_path, "ep2", 3), initial_load_model_only=False,
                        enable=True, interval=1000)
    ep2_on_two.compile.enable, ep2_on_two.compile.components = True, ["model"]
    shrunk, ep2_on_two, tp2 = run_ranks([
        elastic,
        ep2_on_two,
        # TP alone (no data parallel): the MoE layers are FSDP-sharded over the tp ranks only.
        config(tmp_path, data_dir, "tp2", {"tensor_parallel_degree": 2}, local_batch=8, initial_load_path=seed),
    ], 2, str(tmp_path))
    reference = one["losses"]
    assert len(reference) == STEPS
    for run in [*four.values(), tp2]:
        assert run["losses"] == pytest.approx(reference, rel=1e-4)
    for run in (shrunk, ep2_on_two):
        assert run["losses"] == pytest.approx(reference[3:], rel=1e-4)
    starts = [json.loads(line) for line in open(os.path.join(elastic.run_dir, "restarts.jsonl"))]
    assert [(s["world"], s["dp"], s["local_batch"], s["accumulation"]) for s in starts] == [(4, 4, 2, 1), (2, 2, 2, 2)]
    plain = moe_metrics_logged(layouts["ep2"].run_dir)
    assert len(plain) == STEPS and all(f"moe/layer_{i}/max_over_mean" in m for m in plain for i in range(4))
    for name in ("ep2_pp2", "ep2_tp2"):
        logged = moe_metrics_logged(layouts[name].run_dir)
        assert [sorted(m) for m in logged] == [sorted(m) for m in plain], name
        for m, p in zip(logged, plain):
            assert m == pytest.approx(p, rel=1e-6), name
    print("max relative difference:", {name: max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference))
                                       for name, run in [*four.items(), ("tp2", tp2)]})
    check_deepseek_v3(tmp_path, ds_one, ds_ep2_tp2)


# DeepSeek-V3's debug shape with query compression (q_lora_rank > 0, as the 671B recipe; the
# debug flavor has none, as the 16B one): wq_a, q_norm, wq_b and wkv_a, kv_norm, wkv_b all under
# tensor parallel (without compression wq takes wq_b's column-wise style).
def _deepseek_q_lora_spec():
    import dataclasses

    from raytitan.models.deepseek_v3 import spec

    return dataclasses.replace(spec, flavors={"debugmodel": dataclasses.replace(spec.flavor("debugmodel"),
                                                                              q_lora_rank=32)})


DEEPSEEK_Q_LORA = _deepseek_q_lora_spec()


def deepseek_v3_runs(root, data_dir):
    """DeepSeek-V3's runs for the spawns above (with query compression): a seed checkpoint and one
    process's reference on 1 rank, EP 2 x TP 2 from the seed on 4."""
    def ds(name, parallelism=None, local_batch=8, **checkpoint):
        run = config(root, data_dir, name, parallelism, local_batch=local_batch, **checkpoint)
        run.model.name = f"{__name__}:DEEPSEEK_Q_LORA"
        return run

    seed = step_folder(root, "ds_seed", 0)
    return ([ds("ds_seed", create_seed_checkpoint=True), ds("ds_one", initial_load_path=seed)],
            ds("ds_ep2_tp2", {"expert_parallel_degree": 2, "tensor_parallel_degree": 2}, local_batch=4,
               initial_load_path=seed))


def check_deepseek_v3(root, one, ep2_tp2):
    """Latent attention under tensor parallel (split by heads; the down projections, latent norms
    and MoE layers on each rank's sequence shard, their gradients summed over the tp ranks; the
    shared RoPE key gathered), with expert parallel: EP 2 x TP 2 gives one process's first 5
    losses and gradient norms within 1e-5 relative (measured: about 1e-7 and 1.5e-6). Not 1e-4:
    the shared RoPE key's gradient left unsummed over the tp ranks moves the losses by only 5e-5."""
    differences = {}
    pairs = {"loss": (ep2_tp2["losses"], one["losses"]),
             "grad_norm": (grad_norms(root, "ds_ep2_tp2"), grad_norms(root, "ds_one"))}
    for what, (got, reference) in pairs.items():
        assert len(reference) == STEPS
        assert got == pytest.approx(reference, rel=1e-5), what
        differences[what] = max(abs(a - b) / abs(b) for a, b in zip(got, reference))
    print("DeepSeek-V3 EP 2 x TP 2, max relative difference:", differences)


def grad_norms(root, name) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(str(root / name / "run")) if "loss" in m]
