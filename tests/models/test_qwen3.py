"""Qwen3 dense: the model (QK-norm, head_dim of its own, tied head), its published sizes, Hugging
Face parity both ways (tied and untied), layout checks before launch, sampling a checkpoint."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers  # test-only dependency (the dev extra): the reference Qwen3 implementation

import raytitan
from raytitan.components.checkpoint.convert import export_hf, import_hf, read_hf_weights
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState, OptimizerState
from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.config.job import ConfigError, JobConfig
from raytitan.config.plan import plan_run
from raytitan.models import get_spec
from raytitan.models.hf import HFFormatError
from raytitan.models.llama3.model import apply_rope
from raytitan.models.qwen3.args import FLAVORS
from raytitan.models.qwen3.model import Attention, Transformer, rope_frequencies
from raytitan.models.spec import build_meta, count_params
from raytitan.tools.sampling import generate_tokens, load_model

SPEC = get_spec("qwen3")
VOCAB = ByteTokenizer.vocab_size
TIED, UNTIED = FLAVORS["tiny"].with_vocab(VOCAB), FLAVORS["tiny_untied"].with_vocab(VOCAB)


def random_model(args=TIED, seed=0) -> Transformer:
    """Initialized, then every weight moved off its init (norm scales are all 1 at init: the
    QK-norm's RoPE order would not show otherwise)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_step(folder, model, args, step=1) -> str:
    info = {"model": "qwen3", "flavor": "tiny", "model_args": dataclasses.asdict(args), "tokenizer": "byte",
            "bos_id": 256, "eos_id": 257}
    return CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info).save(step)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- the model


def test_head_dim_is_its_own_and_queries_keys_are_normed_per_head_before_rope():
    """wq maps dim 64 to 4 heads of 32 (not 64 / 4 = 16); the attention is RMSNorm per head on q
    and k (a learned scale over head_dim), then RoPE, then causal grouped-query softmax."""
    torch.manual_seed(0)
    attn = Attention(TIED)
    assert attn.wq.weight.shape == (4 * 32, 64) and attn.wk.weight.shape == (2 * 32, 64)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 64)
    freqs = rope_frequencies(TIED, 12)

    def normed(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + TIED.norm_eps) * weight

    q = apply_rope(normed(attn.wq(x).view(2, 12, 4, 32), attn.q_norm.weight), freqs).transpose(1, 2)
    k = apply_rope(normed(attn.wk(x).view(2, 12, 2, 32), attn.k_norm.weight), freqs).transpose(1, 2)
    v = attn.wv(x).view(2, 12, 2, 32).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 32**0.5
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 12, -1))
    torch.testing.assert_close(attn(x, freqs), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # normed queries and keys: scaling their projections changes nothing
        attn.wq.weight.mul_(7.0)
        attn.wk.weight.mul_(0.2)
    torch.testing.assert_close(attn(x, freqs), expected, rtol=1e-4, atol=1e-4)


def test_tied_head_is_the_embeddings_parameter_from_meta_to_training():
    """One Parameter for both (also after to_empty from meta, which gives plain tensors new
    Parameters, and init_weights), counted once, initialized once at the head's scale, saved under
    both names, and trained by the gradients of both uses."""
    model = build_meta(SPEC, TIED)
    assert model.output.weight is model.tok_embeddings.weight
    model.to_empty(device="cpu").init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert {"output.weight", "tok_embeddings.weight"} <= set(model.state_dict())
    untied = build_meta(SPEC, UNTIED)
    assert count_params(untied)[0] - count_params(model)[0] == VOCAB * 64
    std = model.output.weight.std().item()
    assert abs(std - 64**-0.5) < 0.1 * 64**-0.5  # the head's init, not the embedding's unit normal
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens).logsumexp(-1).mean().backward()
    grad = model.tok_embeddings.weight.grad
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[tokens.flatten()] = False
    assert grad[unused].abs().sum() > 0  # rows no input token looked up still learn, through the head
    assert len([p for p in model.parameters()]) == len(set(model.state_dict())) - 1
    # What checkpoints hold: DCP's model state has both names (as build()'s model_keys does), the
    # optimizer state one, the first the model registers.
    assert set(ModelState([model]).state_dict()) == set(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    moments = {k for k in OptimizerState([model], [optimizer]).state_dict() if k.endswith(".exp_avg")}
    assert "state.tok_embeddings.weight.exp_avg" in moments and not any("output" in k for k in moments)


def test_output_shape_and_causality():
    model = random_model()
    tokens = torch.randint(0, VOCAB, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, VOCAB)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


# Totals of transformers' Qwen3ForCausalLM built from each release's config.json (a tied head
# counted once): the figures below, and the same count of the reference built here on meta.
@pytest.mark.parametrize("flavor, published", [
    ("0.6B", 596_049_920),
    ("1.7B", 1_720_574_976),
    ("4B", 4_022_468_096),
    ("8B", 8_190_735_360),
    ("14B", 14_768_307_200),
    ("32B", 32_762_123_264),
])
def test_parameter_counts_match_published(flavor, published):
    args = dataclasses.replace(FLAVORS[flavor], max_seq_len=16)
    assert count_params(build_meta(SPEC, args))[0] == published
    with torch.device("meta"):
        theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SPEC.hf.hf_config(args, torch.bfloat16)))
    assert sum(p.numel() for p in theirs.parameters()) == published
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == args.tie_embeddings


def test_a_tied_head_costs_the_flops_of_an_untied_one():
    """MFU counts the multiplies: the tied head still multiplies every position by vocab x dim."""
    tied, untied = build_meta(SPEC, TIED), build_meta(SPEC, UNTIED)
    assert count_params(tied)[0] < count_params(untied)[0]
    assert SPEC.training_flops_per_token(TIED, tied, 64) == SPEC.training_flops_per_token(UNTIED, untied, 64)
    n, embedding = count_params(untied)
    assert SPEC.training_flops_per_token(UNTIED, untied, 64) == 6 * (n - embedding) + 12 * 4 * 4 * 32 * 64


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("args", [TIED, UNTIED], ids=["tied", "untied"])
def test_transformers_folder_imports_and_exports_with_the_same_logits(tmp_path, args):
    """A folder transformers saved imports into raytitan with its logits (fp32, relative 1e-5);
    raytitan's export of those weights loads in transformers with them too, its head tied
    (lm_head left out, tie_word_embeddings) exactly when the flavor ties it."""
    torch.manual_seed(0)
    theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SPEC.hf.hf_config(args, torch.float32))).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))  # QK-norm scales away from 1
    theirs.save_pretrained(tmp_path / "theirs")
    step = import_hf(str(tmp_path / "theirs"), str(tmp_path / "imported"))
    ours = Transformer(args)
    CheckpointManager(str(tmp_path), {"model": ModelState([ours])}, 0).load_path(step, model_only=True)
    assert (ours.output.weight is ours.tok_embeddings.weight) == args.tie_embeddings
    tokens = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert relative_difference(ours.eval()(tokens), reference) <= 1e-5

    out = export_hf(save_step(tmp_path / "ckpt", ours, args), str(tmp_path / "ours"), dtype=torch.float32)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] == args.tie_embeddings
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != args.tie_embeddings
    back = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == args.tie_embeddings
    with torch.no_grad():
        assert relative_difference(back(tokens).logits, reference) <= 1e-5


def test_raytitan_weights_export_and_import_unchanged(tmp_path):
    """DCP -> Hugging Face -> raytitan names is the identity, RoPE orders included."""
    model = random_model(UNTIED)
    out = export_hf(save_step(tmp_path / "ckpt", model, UNTIED), str(tmp_path / "hf"), dtype=torch.float32)
    weights = read_hf_weights(out)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_an_untied_checkpoint_cannot_load_into_a_tied_flavor():
    untied = SPEC.hf.hf_config(UNTIED, torch.float32)
    SPEC.hf.check_matches(UNTIED, untied)
    SPEC.hf.check_matches(UNTIED, SPEC.hf.hf_config(TIED, torch.float32))  # a tied folder fills both
    with pytest.raises(HFFormatError, match="tie_word_embeddings = false.*pick an untied model.flavor"):
        SPEC.hf.check_matches(TIED, untied)
    with pytest.raises(HFFormatError, match="head_dim = 16, but the model being trained has 32"):
        SPEC.hf.check_matches(TIED, {**SPEC.hf.hf_config(TIED, torch.float32), "head_dim": 16})


# --------------------------------------------------------------------------- layouts


def qwen3_config(flavor: str, **parallelism) -> JobConfig:
    config = JobConfig()
    config.model.name, config.model.flavor = "qwen3", flavor
    config.training.dataset = "synthetic"
    for key, value in parallelism.items():
        setattr(config.parallelism, key, value)
    return config


def test_pipeline_parallel_with_a_tied_head_is_a_config_error_before_launch():
    with pytest.raises(ConfigError, match="ties the output head to the token embedding.*untied flavor"):
        plan_run(qwen3_config("tiny", pipeline_parallel_degree=2), 2, resolve_data=False)
    plan = plan_run(qwen3_config("tiny_untied", pipeline_parallel_degree=2), 2, resolve_data=False)
    assert plan.dims.pp == 2
    with pytest.raises(ConfigError, match="tensor_parallel_degree 4 does not divide the model's n_kv_heads \\(2\\)"):
        plan_run(qwen3_config("tiny", tensor_parallel_degree=4), 4, resolve_data=False)
    assert plan_run(qwen3_config("tiny", tensor_parallel_degree=2, context_parallel_degree=2), 4,
                    resolve_data=False).dims.tp == 2


# --------------------------------------------------------------------------- sampling


def test_sampling_a_checkpoint_follows_the_saved_models_argmax(tmp_path):
    """load_model rebuilds the tied model from a step (its logits are the saved model's, whose
    parity with transformers is tested above); greedy decoding is the saved model's step-by-step
    argmax, and ``raytitan.generate`` decodes it."""
    model = random_model()
    save_step(tmp_path / "ckpt", model, TIED, step=3)
    loaded, tokenizer = load_model(str(tmp_path / "ckpt"))
    assert isinstance(loaded, Transformer) and loaded.output.weight is loaded.tok_embeddings.weight
    prompt, steps = [256, *b"Hello"], 8
    ours = generate_tokens(loaded, prompt, steps)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            top2 = model(torch.tensor([tokens]))[0, -1].topk(2)
            assert top2.values[0] - top2.values[1] > 1e-3  # a clear winner each time
            tokens.append(int(top2.indices[0]))
    assert ours == tokens[len(prompt):]
    stop = tokenizer.eos_id
    expected = tokenizer.decode(ours[:ours.index(stop)] if stop in ours else ours)
    assert raytitan.generate(str(tmp_path / "ckpt"), "Hello", max_new_tokens=steps) == expected
