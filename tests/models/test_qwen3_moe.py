"""Qwen3-MoE: Hugging Face parity both ways, the published parameter counts (total and
activated), training with the load-balancing bias moving and checkpointed, the trainer's hook,
and the layouts refused before launch (data parallel only in this version)."""

import dataclasses
import os

import pytest
import torch
import transformers  # test-only dependency (the dev extra): the reference Qwen3-MoE implementation

from raytitan.components.checkpoint.convert import export_hf, import_hf
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.config.job import ConfigError, JobConfig, parse_args
from raytitan.config.plan import plan_run
from raytitan.models import get_spec
from raytitan.models.moe import MoE
from raytitan.models.qwen3_moe.args import FLAVORS, ModelArgs
from raytitan.models.qwen3_moe.model import Transformer
from raytitan.models.spec import build_meta, count_params
from raytitan.trainer.build import after_optimizer_step
from tests.models.family import one_thread, relative_difference, check_fsdp_matches_one_process, save_step, train_repeated_batch  # noqa: F401 (one_thread: autouse)

SPEC = get_spec("qwen3_moe")
VOCAB = ByteTokenizer.vocab_size
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, moe_inter_dim=32, num_experts=8, top_k=2,
                 vocab_size=VOCAB, max_seq_len=64)








# --------------------------------------------------------------------------- Hugging Face


def test_transformers_weights_import_with_the_same_logits_and_export_unchanged(tmp_path):
    """A tiny Qwen3MoeForCausalLM (random weights, QK-norm scales off 1) saved by transformers
    imports into raytitan with its logits (fp32, eval, relative 1e-5); raytitan's export writes
    exactly the tensors transformers saved (per-expert matrices, RoPE orders restored, no bias),
    and loads back in transformers with the same logits."""
    from safetensors.torch import load_file

    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    step = import_hf(str(tmp_path / "theirs"), str(tmp_path / "imported"))
    ours = Transformer(TINY)
    CheckpointManager(str(tmp_path), {"model": ModelState([ours])}, 0).load_path(step, model_only=True)
    SPEC.hf.check_matches(TINY, config.to_dict())
    assert all(m.router.expert_bias.abs().sum() == 0 for m in ours.modules() if isinstance(m, MoE))
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert relative_difference(ours.eval()(tokens), reference) <= 1e-5

    out = export_hf(save_step(tmp_path / "ckpt", ours, TINY, "qwen3_moe"), str(tmp_path / "ours"),
                    dtype=torch.float32)
    saved, exported = load_file(tmp_path / "theirs" / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    back = transformers.Qwen3MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert relative_difference(back(tokens).logits, reference) <= 1e-5


# --------------------------------------------------------------------------- published shapes


# Exact counts from the published shapes (every layer MoE, untied head, vocab 151936), and the
# figures the model cards round them to: Qwen3-30B-A3B "30.5B in total and 3.3B activated",
# Qwen3-235B-A22B "235B in total and 22B activated".
@pytest.mark.parametrize("flavor, total, activated, card_total, card_activated", [
    ("30B-A3B", 30_532_122_624, 3_353_032_704, 30.5e9, 3.3e9),
    ("235B-A22B", 235_093_634_560, 22_190_763_520, 235e9, 22e9),
])
def test_parameter_counts_total_and_activated_match_published(flavor, total, activated, card_total, card_activated):
    args = dataclasses.replace(FLAVORS[flavor], max_seq_len=16)
    model = build_meta(SPEC, args)
    assert count_params(model)[0] == total
    assert SPEC.training_flops_per_token(args, model, 0) == 6 * (activated - args.vocab_size * args.dim)
    # The cards cut the figures after their last published digit (0.1B for 30.5B and 3.3B, 1B for
    # 235B and 22B): 3,353,032,704 activated reads "3.3B", not the rounded 3.4B.
    digit = 0.1e9 if flavor == "30B-A3B" else 1e9
    assert card_total <= total < card_total + digit and card_activated <= activated < card_activated + digit
    if flavor == "30B-A3B":  # transformers' model of the release counts the same
        with torch.device("meta"):
            reference = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
                **SPEC.hf.hf_config(args, torch.bfloat16)))
        assert sum(p.numel() for p in reference.parameters()) == total


# --------------------------------------------------------------------------- training


def test_debug_model_trains_and_its_bias_moves_and_is_checkpointed(tmp_path):
    """The debug flavor, one process: loss falls over 10 AdamW steps on a repeated batch; the
    spec's after-optimizer-step hook (as the trainer chains it) moves every layer's expert bias;
    evaluation forwards count no tokens; the bias is in the checkpoint and comes back on load."""
    args = FLAVORS["debugmodel"].with_vocab(VOCAB)
    args = dataclasses.replace(args, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    losses, biases, tokens = train_repeated_batch(model, SPEC, VOCAB, watched_layer="0")
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(biases[0], biases[-1]) and biases[-1].abs().sum() > 0
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))  # counted, reset
    with torch.no_grad():
        model.eval()(tokens[:, :-1])  # validation and sampling leave the next update alone
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))

    assert "layers.0.moe.router.expert_bias" in ModelState([model]).state_dict()
    step = save_step(tmp_path / "ckpt", model, args, "qwen3_moe")
    fresh = Transformer(args)
    fresh.init_weights()
    CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([fresh])}, 0).load_path(step, model_only=True)
    for name in ("0", "3"):
        assert torch.equal(fresh.layers[name].moe.router.expert_bias, model.layers[name].moe.router.expert_bias)


def test_families_without_moe_have_no_hook_and_float8_scales_still_chain():
    assert get_spec("llama3").after_optimizer_step is None and get_spec("qwen3").after_optimizer_step is None
    calls = []
    spec = dataclasses.replace(SPEC, after_optimizer_step=lambda parts, group: calls.append((parts, group)))
    after_optimizer_step(spec, ["part"], "dp", False)()
    assert calls == [(["part"], "dp")]


def test_float8_converts_the_attention_projections_only():
    """Float8 swaps nn.Linear layers: the experts are stacked Parameters (never converted), and the
    router's gate is kept out so experts are chosen by full-precision scores."""
    from raytitan.config.job import Float8
    from raytitan.distributed.float8 import convert_to_float8
    from raytitan.models.qwen3_moe.parallelize import float8_settings

    model = build_meta(SPEC, TINY)
    converted = convert_to_float8(model, float8_settings(Float8(emulate=True)))
    assert converted == sorted(f"layers.{i}.attention.{w}" for i in range(2) for w in ("wk", "wo", "wq", "wv"))


# --------------------------------------------------------------------------- layouts


def moe_config(**parallelism) -> JobConfig:
    config = JobConfig()
    config.model.name, config.model.flavor = "qwen3_moe", "debugmodel"
    config.training.dataset = "synthetic"
    for key, value in parallelism.items():
        setattr(config.parallelism, key, value)
    return config


def test_data_tensor_and_pipeline_parallel_layouts_are_accepted_before_launch():
    """Context parallel is refused; tensor parallel (attention split, the MoE layers on each
    rank's sequence shard) and pipeline parallel plan (parity: tests/parallel/test_expert_parallel.py)."""
    with pytest.raises(ConfigError, match="does not support context parallel"):
        plan_run(moe_config(context_parallel_degree=2), 2, resolve_data=False)
    assert plan_run(moe_config(tensor_parallel_degree=2), 2, resolve_data=False).dims.tp == 2
    assert plan_run(moe_config(pipeline_parallel_degree=2), 2, resolve_data=False).dims.pp == 2
    assert plan_run(moe_config(), 2, resolve_data=False).dims.dp_shard == 2
    hsdp = plan_run(moe_config(data_parallel_replicate_degree=2), 4, resolve_data=False).dims
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 2)


@pytest.mark.parametrize("name, world, ep", [("qwen3_moe_debug.toml", 2, 2), ("qwen3_moe_30b_a3b.toml", 16, 8),
                                             ("qwen3_moe_235b_a22b.toml", 256, 16)])
def test_shipped_configs_plan(name, world, ep):
    """The recipes plan at their world size as FSDP with expert parallel (tokenizer and data
    swapped for ones present here), each on its published flavor."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
    config = parse_args(["--job.config_file", path, "--model.tokenizer", "byte"])
    config.model.hf_assets_path = None
    plan = plan_run(config, world, resolve_data=False)
    assert (plan.dims.dp_shard, plan.dims.ep, plan.dims.efsdp, plan.dims.tp, plan.dims.pp) == (world, ep, world // ep, 1, 1)
    assert plan.global_batch_size == config.training.global_batch_size
    assert FLAVORS[config.model.flavor].num_experts % ep == 0


# --------------------------------------------------------------------------- FSDP


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_one_process(tmp_path, data_dir):
    """FSDP over 2 ranks gives one process's losses and moves the bias (``check_fsdp_matches_one_process``)."""
    check_fsdp_matches_one_process(tmp_path, data_dir, "qwen3_moe", moe_layer="0")
