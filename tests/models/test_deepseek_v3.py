"""DeepSeek-V3: multi-head latent attention's shapes and causality, the published parameter
counts (total and activated), Hugging Face parity both ways (YaRN RoPE and group-limited sigmoid
routing included), training with the load-balancing bias moving, and the layouts refused before
launch (data parallel only in this version)."""

import dataclasses
import math
import os

import pytest
import torch
import transformers  # test-only dependency (the dev extra): the reference DeepSeek-V3 implementation

from raytitan.components.checkpoint.convert import export_hf, import_hf
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.config.job import ConfigError, JobConfig, parse_args
from raytitan.config.plan import plan_run
from raytitan.models import get_spec
from raytitan.models.hf import HFFormatError
from raytitan.models.moe import MoE

SPEC = get_spec("deepseek_v3")
from raytitan.models.deepseek_v3.args import FLAVORS, ModelArgs  # noqa: E402  (after the spec: import order)
from raytitan.models.deepseek_v3.model import Transformer  # noqa: E402
from raytitan.models.spec import build_meta, count_params  # noqa: E402
from tests.models.family import one_thread, relative_difference, check_fsdp_matches_one_process, save_step, train_repeated_batch  # noqa: F401 (one_thread: autouse)

VOCAB = ByteTokenizer.vocab_size
# Every MLA and routing feature at a tiny size: query compression, 2 layers (1 dense), 8 experts
# in 4 groups (2 kept), 2 active + 1 shared, sigmoid scores, renormalized, scale 2.5, YaRN.
TINY = ModelArgs(dim=64, n_layers=2, n_dense_layers=1, n_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, moe_inter_dim=32,
                 num_experts=8, num_shared_experts=1, top_k=2, score_func="sigmoid", route_norm=True, route_scale=2.5,
                 n_expert_groups=4, n_limited_groups=2, vocab_size=VOCAB, rope_factor=40.0,
                 rope_original_max_seq_len=16, mscale=1.0, max_seq_len=64)








# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_mla_shapes_and_causality(q_lora_rank):
    """Logits [batch, seq, vocab]; the dense layer has a feed-forward and no MoE, the MoE layer
    the reverse; changing a later token changes no earlier logit; document masking keeps the
    second document's logits those of the document alone."""
    args = dataclasses.replace(TINY, q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.eval()
    names = {n for n, _ in model.named_parameters()}
    assert ("layers.0.attention.wq.weight" in names) == (q_lora_rank == 0)
    assert ("layers.0.attention.wq_a.weight" in names) == (q_lora_rank > 0)
    assert model.layers["0"].moe is None and model.layers["1"].feed_forward is None
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (2, 12, VOCAB)
        changed = tokens.clone()
        changed[:, 7] = (changed[:, 7] + 1) % VOCAB
        after = model(changed)
        assert torch.equal(logits[:, :7], after[:, :7]) and not torch.allclose(logits[:, 7:], after[:, 7:])
        documents = torch.tensor([[0] * 5 + [1] * 7] * 2)
        packed = model(tokens, document_ids=documents)
        alone = model(tokens[:, 5:])
        assert torch.allclose(packed[:, 5:], alone, atol=1e-5)


# --------------------------------------------------------------------------- Hugging Face


def reference_config(**changes) -> "transformers.DeepseekV3Config":
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6, max_position_embeddings=64,
                  tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                   "original_max_position_embeddings": 16})
    return transformers.DeepseekV3Config(**{**values, **changes})


def test_transformers_weights_import_with_the_same_logits_and_export_unchanged(tmp_path):
    """A tiny DeepseekV3ForCausalLM (random weights, norms off 1, a nonzero routing bias) saved by
    transformers imports into raytitan with its logits (fp32, eval, relative 1e-5); raytitan's
    export writes exactly the tensors transformers saved (per-expert matrices, the bias as
    e_score_correction_bias), and loads back in transformers with the same logits."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(reference_config()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn_like(b))
    theirs.save_pretrained(tmp_path / "theirs")
    step = import_hf(str(tmp_path / "theirs"), str(tmp_path / "imported"))
    ours = Transformer(TINY)
    CheckpointManager(str(tmp_path), {"model": ModelState([ours])}, 0).load_path(step, model_only=True)
    SPEC.hf.check_matches(TINY, theirs.config.to_dict())
    assert ours.layers["1"].moe.router.expert_bias.abs().sum() > 0
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        reference = theirs(tokens).logits
        imported_error = relative_difference(ours.eval()(tokens), reference)
    assert imported_error <= 1e-5

    out = export_hf(save_step(tmp_path / "ckpt", ours, TINY, "deepseek_v3"), str(tmp_path / "ours"),
                    dtype=torch.float32)
    saved, exported = load_file(tmp_path / "theirs" / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        exported_error = relative_difference(back(tokens).logits, reference)
    assert exported_error <= 1e-5
    print(f"relative error: imported {imported_error:.2e}, exported {exported_error:.2e}")


def test_hf_config_refusals():
    """A config.json of another shape, RoPE factor or the unsupported rope layout is refused, and so
    are FP8-quantized weights (the release's; dequantized copies import); a softmax-routed shape (the 16B flavor) has no DeepseekV3ForCausalLM counterpart."""
    with pytest.raises(HFFormatError, match="kv_lora_rank"):
        SPEC.hf.check_matches(TINY, reference_config(kv_lora_rank=16).to_dict())
    with pytest.raises(HFFormatError, match="RoPE scaling factor"):
        SPEC.hf.check_matches(TINY, reference_config(rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 10000.0}).to_dict())
    with pytest.raises(HFFormatError, match="rope_interleave"):
        SPEC.hf.from_hf("model.norm.weight", torch.ones(4), {"rope_interleave": False, "num_hidden_layers": 2})
    assert SPEC.hf.from_hf("model.layers.2.eh_proj.weight", torch.ones(4), {"num_hidden_layers": 2}) == {}  # MTP
    with pytest.raises(HFFormatError, match="FP8"):
        SPEC.hf.from_hf("model.layers.0.self_attn.o_proj.weight_scale_inv", torch.ones(4), {"num_hidden_layers": 2})
    with pytest.raises(HFFormatError, match="softmax"):
        SPEC.hf.hf_config(FLAVORS["16B"], torch.bfloat16)


# --------------------------------------------------------------------------- published shapes


# Exact counts from the published shapes, and the figures published for them: DeepSeek-V3
# (technical report, arXiv 2412.19437) "671B total parameters with 37B activated for each token"
# (the 685B of the Hugging Face release adds the 14B multi-token-prediction module, not built
# here); DeepSeek-V2-Lite, the shape of torchtitan's "16B" flavor (arXiv 2405.04434), "15.7B
# parameters in total, where 2.4B are activated for each token". DeepSeek counts activated
# parameters without the input embedding (a table lookup): 36.63B and 2.45B here, which the
# published figures give as 37B and 2.4B; the totals 671.03B and 15.71B as 671B and 15.7B.
@pytest.mark.parametrize("flavor, total, activated, published_total, published_activated, digit", [
    ("671B", 671_026_404_352, 37_552_282_624, 671e9, 37e9, 1e9),
    ("16B", 15_706_484_224, 2_661_150_208, 15.7e9, 2.4e9, 0.1e9),
])
def test_parameter_counts_total_and_activated_match_published(flavor, total, activated, published_total,
                                                              published_activated, digit):
    args = dataclasses.replace(FLAVORS[flavor], max_seq_len=16)
    model = build_meta(SPEC, args)
    assert count_params(model)[0] == total
    embedding = args.vocab_size * args.dim
    # FLOPs per token count the activated parameters (no attention term at seq_len 0).
    assert SPEC.training_flops_per_token(args, model, 0) == 6 * (activated - embedding)
    # The published figures, to their precision: the count rounded, or cut, at their last digit
    # (the totals and 36.63B -> 37B round; 2.45B -> 2.4B is cut).
    assert round(published_total / digit) in published_readings(total, digit)
    assert round(published_activated / digit) in published_readings(activated - embedding, digit)


def published_readings(count: int, digit: float) -> set[int]:
    """A count in units of the published last digit, rounded and cut."""
    return {round(count / digit), math.floor(count / digit)}


def test_671b_shape_is_transformers_default_config():
    """The 671B flavor's config.json is transformers' DeepseekV3Config defaults (the release's
    shape), and the YaRN softmax scale is the release's: 192^-0.5 x (0.1 ln 40 + 1)^2."""
    expected = transformers.DeepseekV3Config().to_dict()
    ours = SPEC.hf.hf_config(FLAVORS["671B"], torch.bfloat16)
    for key in SPEC.hf.compared_keys:
        assert ours[key] == expected[key], key
    assert FLAVORS["671B"].softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * torch.tensor(40.0).log().item() + 1) ** 2)


# --------------------------------------------------------------------------- training


def test_debug_model_trains_and_its_bias_moves_and_is_checkpointed(tmp_path):
    """The debug flavor, one process: loss falls over 10 AdamW steps on a repeated batch; the
    spec's after-optimizer-step hook moves every MoE layer's expert bias; the bias is in the
    checkpoint and comes back on load."""
    args = dataclasses.replace(FLAVORS["debugmodel"].with_vocab(VOCAB), max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    losses, biases, tokens = train_repeated_batch(model, SPEC, VOCAB, watched_layer="1")
    print(f"losses: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(biases[0], biases[-1]) and biases[-1].abs().sum() > 0
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))

    step = save_step(tmp_path / "ckpt", model, args, "deepseek_v3")
    fresh = Transformer(args)
    fresh.init_weights()
    CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([fresh])}, 0).load_path(step, model_only=True)
    assert torch.equal(fresh.layers["3"].moe.router.expert_bias, model.layers["3"].moe.router.expert_bias)


# --------------------------------------------------------------------------- layouts


def ds_config(flavor="debugmodel", **parallelism) -> JobConfig:
    config = JobConfig()
    config.model.name, config.model.flavor = "deepseek_v3", flavor
    config.training.dataset = "synthetic"
    for key, value in parallelism.items():
        setattr(config.parallelism, key, value)
    return config


def test_data_tensor_and_pipeline_parallel_layouts_are_accepted_before_launch():
    """Tensor parallel splits the latent attention by heads: a degree that divides the 8 debug heads
    plans, another is refused; no context parallel; pipeline parallel plans."""
    assert plan_run(ds_config(tensor_parallel_degree=2), 2, resolve_data=False).dims.tp == 2
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree 3 does not divide the model's n_heads \(8\)"):
        plan_run(ds_config(tensor_parallel_degree=3), 3, resolve_data=False)
    with pytest.raises(ConfigError, match="does not support context parallel"):
        plan_run(ds_config(context_parallel_degree=2), 2, resolve_data=False)
    assert plan_run(ds_config(pipeline_parallel_degree=2), 2, resolve_data=False).dims.pp == 2
    assert plan_run(ds_config(), 2, resolve_data=False).dims.dp_shard == 2


# --------------------------------------------------------------------------- FSDP


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_one_process(tmp_path, data_dir):
    """FSDP over 2 ranks gives one process's losses and moves the bias (``check_fsdp_matches_one_process``)."""
    check_fsdp_matches_one_process(tmp_path, data_dir, "deepseek_v3", moe_layer="1")


@pytest.mark.parametrize("name, world", [("deepseek_v3_debug.toml", 2), ("deepseek_v3_16b.toml", 8),
                                         ("deepseek_v3_671b.toml", 512)])
def test_shipped_configs_plan(name, world):
    """The recipes plan at their world size as data parallel (tokenizer and data swapped for ones
    present here)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
    config = parse_args(["--job.config_file", path, "--model.tokenizer", "byte"])
    config.model.hf_assets_path = None
    plan = plan_run(config, world, resolve_data=False)
    assert (plan.dims.dp_shard, plan.dims.tp, plan.dims.pp) == (world, 1, 1)
