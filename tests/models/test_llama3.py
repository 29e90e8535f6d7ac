import dataclasses

import pytest
import torch
import torch.nn.functional as F

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


# Published totals (Hugging Face model cards / safetensors metadata of Meta's releases).
@pytest.mark.parametrize("flavor, published", [
    ("8B", 8_030_261_248),
    ("70B", 70_553_706_496),
    ("405B", 405_853_388_800),
])
def test_parameter_counts_match_published(flavor, published):
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(FLAVORS[flavor], max_seq_len=16))
    assert count_params(model)[0] == published


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
