import dataclasses

import pytest
import torch
import torch.nn.functional as F

from raytitan.models import get_spec
from raytitan.models.llama3.args import FLAVORS, ModelArgs
from raytitan.models.llama3.model import Attention, Transformer, apply_rope, count_params, flops_per_token, rope_frequencies

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def tiny_model(args=TINY) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return model


def test_output_shape():
    logits = tiny_model()(torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)


def test_causality():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_equals_repeated_kv():
    torch.manual_seed(0)
    attn = Attention(TINY)
    for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
        torch.nn.init.normal_(lin.weight, std=0.1)
    x = torch.randn(2, 12, TINY.dim)
    freqs = rope_frequencies(TINY, 12)
    q = apply_rope(attn.wq(x).view(2, 12, 4, 16), freqs).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 12, 2, 16), freqs).transpose(1, 2)
    v = attn.wv(x).view(2, 12, 2, 16).transpose(1, 2)
    # Each KV head serves n_heads / n_kv_heads consecutive query heads.
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 16**0.5
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 12, -1))
    torch.testing.assert_close(attn(x, freqs), expected, rtol=1e-5, atol=1e-5)


def test_rope_is_a_relative_rotation():
    """Scores depend only on the distance between positions, which is what RoPE promises."""
    freqs = rope_frequencies(TINY, 32)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 32, 1, 16), torch.randn(1, 1, 1, 16).expand(1, 32, 1, 16)
    rq, rk = apply_rope(q, freqs)[0, :, 0], apply_rope(k, freqs)[0, :, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[20] @ rk[17], rtol=1e-4, atol=1e-4)


def test_llama31_rope_scaling_keeps_high_frequencies():
    plain = rope_frequencies(dataclasses.replace(TINY, rope_scaling_factor=None), 2)[1].angle()
    scaled = rope_frequencies(dataclasses.replace(TINY, rope_theta=500000.0), 2)[1].angle()
    assert torch.isclose(plain[0], scaled[0])  # shortest wavelength untouched
    assert torch.isclose(scaled[-1], plain[-1] / 8, rtol=1e-4)  # longest divided by the factor


# Published totals (Hugging Face model cards / safetensors metadata of Meta's releases; Llama 3.2's
# tied head counted once). The untied 1B / 3B are what raytitan trained as 1B / 3B before.
@pytest.mark.parametrize("flavor, published", [
    ("1B", 1_235_814_400),
    ("3B", 3_212_749_824),
    ("8B", 8_030_261_248),
    ("70B", 70_553_706_496),
    ("405B", 405_853_388_800),
    ("1B_untied", 1_235_814_400 + 128256 * 2048),
    ("3B_untied", 3_212_749_824 + 128256 * 3072),
])
def test_parameter_counts_match_published(flavor, published):
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(FLAVORS[flavor], max_seq_len=16))
    assert count_params(model)[0] == published
    assert (model.output.weight is model.tok_embeddings.weight) == FLAVORS[flavor].tie_embeddings


# meta-llama/Llama-3.2-1B and -3B config.json: what their Hugging Face export must say.
LLAMA32 = {"rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256, "intermediate_size": 8192,
           "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("flavor, published, shape", [
    ("1B", 1_235_814_400, {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64}),
    ("3B", 3_212_749_824, {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "head_dim": 128}),
])
def test_llama32_flavors_are_the_published_architecture(flavor, published, shape):
    """1B / 3B export the config.json values of Meta's releases (tied head, RoPE scaled by 32 from
    8,192 positions, theta 500,000), and transformers' LlamaForCausalLM built from that config has
    the published total, its head tied."""
    import transformers

    config = get_spec("llama3").hf.hf_config(FLAVORS[flavor], torch.bfloat16)
    assert {k: config[k] for k in LLAMA32} == LLAMA32 and {k: config[k] for k in shape} == shape
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    assert sum(p.numel() for p in theirs.parameters()) == published
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight


def test_tied_head_is_the_embeddings_parameter_and_costs_the_flops_of_an_untied_one():
    """One Parameter from meta through to_empty and init (initialized once, at the head's scale),
    saved under both names; MFU still counts the head's multiplies."""
    tied_args = dataclasses.replace(TINY, tie_embeddings=True)
    with torch.device("meta"):
        tied, untied = Transformer(tied_args), Transformer(TINY)
    tied.to_empty(device="cpu").init_weights()
    assert tied.output.weight is tied.tok_embeddings.weight
    assert {"output.weight", "tok_embeddings.weight"} <= set(tied.state_dict())
    assert abs(tied.output.weight.std().item() - 64**-0.5) < 0.1 * 64**-0.5
    assert count_params(untied)[0] - count_params(tied)[0] == 97 * 64
    assert flops_per_token(tied_args, *count_params(tied), 32) == flops_per_token(TINY, *count_params(untied), 32)


def test_a_tied_flavor_refuses_pipeline_parallel_and_untied_checkpoints(tmp_path):
    """A tied head and its embedding cannot sit on two pipeline stages (a config error before
    launch); a step saved untied (as raytitan's 1B / 3B were) does not load into a tied model: both
    names would load into the one weight, one of them silently winning."""
    from raytitan.components.checkpoint.layout import CheckpointError
    from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
    from raytitan.config.job import ConfigError, JobConfig
    from raytitan.config.plan import plan_run

    def config(flavor):
        c = JobConfig()
        c.model.flavor, c.parallelism.pipeline_parallel_degree, c.training.dataset = flavor, 2, "synthetic"
        return c

    with pytest.raises(ConfigError, match="ties the output head to the token embedding.*untied flavor"):
        plan_run(config("1B"), 2, resolve_data=False)
    assert plan_run(config("1B_untied"), 2, resolve_data=False).dims.pp == 2

    tied_args = dataclasses.replace(TINY, tie_embeddings=True)

    def manager(folder, args):
        model = Transformer(args)
        info = {"model": "llama3", "model_args": dataclasses.asdict(args)}
        return model, CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info)

    untied_step = manager(tmp_path / "untied", TINY)[1].save(1)
    tied_model, tied_manager = manager(tmp_path / "tied", tied_args)
    tied_step = tied_manager.save(1)
    with pytest.raises(CheckpointError, match="saved with an untied output head.*ties output.weight to "
                                              "tok_embeddings.weight.*1B_untied"):
        tied_manager.load_path(untied_step, model_only=True)
    tied_manager.load_path(tied_step, model_only=True)
    assert tied_model.output.weight is tied_model.tok_embeddings.weight
    untied_model, untied_manager = manager(tmp_path / "other", TINY)
    untied_manager.load_path(tied_step, model_only=True)  # untying is fine: two copies of one matrix
    assert torch.equal(untied_model.output.weight, untied_model.tok_embeddings.weight)


def test_flops_per_token_for_8b():
    args = FLAVORS["8B"]
    n, emb = 8_030_261_248, 128256 * 4096
    expected = 6 * (n - emb) + 12 * 32 * 32 * 128 * 8192
    assert flops_per_token(args, n, emb, 8192) == expected
    assert round(expected / 1e9, 1) == 57.9  # ~58 GFLOP per token at seq 8192


def test_init_is_depth_scaled_and_seeded():
    a, b = tiny_model(), tiny_model()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    std0 = a.layers["0"].attention.wo.weight.std()
    std1 = a.layers["1"].attention.wo.weight.std()
    assert std1 < std0


def test_tied_head_stays_the_embeddings_parameter_under_tensor_parallel():
    """Tensor parallel gives the embedding and the head a DTensor each (both sharded by vocab row):
    the plan ties the head back, and it stays tied through to_empty and init_weights (one rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from raytitan.models.llama3.parallelize import apply_tensor_parallel

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = Transformer(dataclasses.replace(TINY, tie_embeddings=True))
        apply_tensor_parallel(model, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)), loss_parallel=True)
        assert model.output.weight is model.tok_embeddings.weight
        model.to_empty(device="cpu").init_weights()
        weight = model.output.weight
        assert weight is model.tok_embeddings.weight and isinstance(weight, DTensor)
        assert weight.placements == (Shard(0),)
    finally:
        dist.destroy_process_group()
