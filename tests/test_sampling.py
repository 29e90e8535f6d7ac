import dataclasses
import os

import pytest
import torch

import raytitan
from raytitan.components.checkpoint.layout import CheckpointError
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.components.data.tokenizer import ByteTokenizer, HFTokenizer
from raytitan.models.llama3.args import FLAVORS
from raytitan.models.llama3.model import Transformer
from raytitan.tools.sampling import generate_tokens, load_model

from tests.data.test_sources import make_hf_tokenizer

ARGS = FLAVORS["tiny"].with_vocab(259)


def saved_model(folder, **tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    info = {"model_args": dataclasses.asdict(ARGS), "tokenizer": "byte", "bos_id": 256, "eos_id": 257, **tokenizer}
    CheckpointManager(str(folder), {"model": ModelState([model])}, 0, commit_info=info).save(2)
    return model.eval()


def test_greedy_decoding_follows_the_argmax(tmp_path):
    model = saved_model(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    prompt = [256, 72, 105]
    new = generate_tokens(loaded, prompt, 5)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert new == tokens[3:]


def test_generate_returns_text_and_sampling_is_seeded(tmp_path):
    saved_model(tmp_path)
    greedy = raytitan.generate(str(tmp_path), "Hello", max_new_tokens=8)
    assert isinstance(greedy, str) and greedy == raytitan.generate(str(tmp_path), "Hello", max_new_tokens=8)
    a = raytitan.generate(str(tmp_path), "Hello", max_new_tokens=8, temperature=1.0, seed=1)
    assert a == raytitan.generate(str(tmp_path), "Hello", max_new_tokens=8, temperature=1.0, seed=1)


@pytest.mark.parametrize("recorded", ["moved", None])
def test_a_checkpoint_whose_hf_tokenizer_is_not_found_is_an_error_not_bytes(tmp_path, recorded):
    """A run trained with model.tokenizer = 'hf' decodes nothing sensible with the byte tokenizer:
    its tokenizer files not being where the checkpoint says is an error naming the way out."""
    where = str(tmp_path / "moved") if recorded else None
    saved_model(tmp_path / "ckpt", tokenizer="hf", hf_assets_path=where)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(tmp_path / "ckpt"))
    message = str(caught.value)
    assert os.path.join(str(tmp_path / "ckpt"), "step-2") in message  # the checkpoint
    assert (os.path.join(where, "tokenizer.json") if where else "records no model.hf_assets_path") in message
    assert "tokenizer_folder=" in message  # what to pass instead
    with pytest.raises(CheckpointError, match="tokenizer_folder"):
        raytitan.generate(str(tmp_path / "ckpt"), "Hello", max_new_tokens=2)

    folder = make_hf_tokenizer(str(tmp_path / "tok"))
    _, tokenizer = load_model(str(tmp_path / "ckpt"), tokenizer_folder=folder)
    assert isinstance(tokenizer, HFTokenizer)
    with pytest.raises(CheckpointError, match=f"no tokenizer.json in {tmp_path}"):
        load_model(str(tmp_path / "ckpt"), tokenizer_folder=str(tmp_path))  # a wrong folder is no better


def test_a_byte_tokenizer_checkpoint_needs_no_files(tmp_path):
    saved_model(tmp_path)
    assert isinstance(load_model(str(tmp_path))[1], ByteTokenizer)


# --------------------------------------------------------------------------- what is generated


def successor_model(args) -> Transformer:
    """A model whose next token is always the last one + 1 (mod vocab): the blocks write nothing
    (zero output projections), so position t's logits are the output layer on the normed
    embedding of token t, and output row j is the unit embedding of token j - 1."""
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        embedding = model.tok_embeddings.weight
        model.output.weight.copy_(10 * torch.roll(embedding / embedding.norm(dim=1, keepdim=True), 1, dims=0))
    return model.eval()


def test_greedy_decoding_continues_a_model_whose_continuation_is_known():
    """Also past max_seq_len, where only the last max_seq_len tokens are seen."""
    args = dataclasses.replace(ARGS, max_seq_len=8)
    model = successor_model(args)
    every = torch.arange(args.vocab_size)
    with torch.no_grad():  # the construction does what it says, for every token
        assert torch.equal(model(every[:, None])[:, -1].argmax(-1), (every + 1) % args.vocab_size)
    prompt = [256, 72, 105, 250]
    assert generate_tokens(model, prompt, 20) == [(250 + i) % args.vocab_size for i in range(1, 21)]
    assert generate_tokens(model, prompt, 20, stop=255) == [251, 252, 253, 254]
    assert generate_tokens(model, prompt, 20, temperature=0.5, top_k=1) == generate_tokens(model, prompt, 20)


def scaled_model(scale: float) -> Transformer:
    """A randomly initialized model with its output layer scaled: 30 makes the top logits far apart
    (clear greedy winners); 3 spreads the next-token distribution so that temperature and top_k
    change what is drawn (about half the mass lies outside the top 4 at temperature 1)."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    with torch.no_grad():
        model.output.weight.mul_(scale)
    return model.eval()


def test_greedy_tokens_are_what_transformers_generates(tmp_path):
    """The same checkpoint exported to Hugging Face and decoded greedily by transformers'
    LlamaForCausalLM.generate (a KV-cached reference implementation) gives the same tokens."""
    transformers = pytest.importorskip("transformers")  # the dev extra
    from raytitan.components.checkpoint.convert import export_hf

    model = scaled_model(30)
    info = {"model_args": dataclasses.asdict(ARGS), "tokenizer": "byte", "bos_id": 256, "eos_id": 257}
    CheckpointManager(str(tmp_path / "ckpt"), {"model": ModelState([model])}, 0, commit_info=info).save(3)
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    prompt, steps = [256, 72, 101, 108, 108, 111], 16
    ours = generate_tokens(loaded, prompt, steps)
    tokens = list(prompt)
    with torch.no_grad():  # the step-by-step argmax of the full forward, with a clear winner each time
        for _ in range(steps):
            top2 = model(torch.tensor([tokens]))[0, -1].topk(2)
            assert top2.values[0] - top2.values[1] > 1e-3
            tokens.append(int(top2.indices[0]))
    assert ours == tokens[len(prompt):]

    exported = export_hf(str(tmp_path / "ckpt" / "step-3"), str(tmp_path / "hf"), dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                              pad_token_id=257)
    assert out[0, len(prompt):].tolist() == ours


def test_sampling_follows_the_models_distribution_restricted_to_the_top_k():
    """With a fixed generator each sampled id is the draw from softmax(logits / temperature) over
    the k most likely ids, computed here from the model's own full forward at every step."""
    model = scaled_model(3)
    prompt, k, temperature = [256, 72, 105], 3, 1.5
    sampled = generate_tokens(model, prompt, 24, temperature, top_k=k, generator=torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    tokens = list(prompt)
    with torch.no_grad():
        for token in sampled:
            logits = model(torch.tensor([tokens]))[0, -1]
            top = logits.topk(k)
            assert token in top.indices.tolist()
            probs = torch.zeros_like(logits)
            probs[top.indices] = torch.softmax(top.values / temperature, -1)
            assert token == int(torch.multinomial(probs, 1, generator=reference))
            tokens.append(token)
    again = generate_tokens(model, prompt, 24, temperature, top_k=k, generator=torch.Generator().manual_seed(3))
    assert again == sampled
    top_1 = generate_tokens(model, prompt, 24, temperature, top_k=1, generator=torch.Generator().manual_seed(3))
    assert top_1 == generate_tokens(model, prompt, 24)  # top_k = 1 is greedy, whatever the temperature


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are always ``logits``."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)
        self.args = dataclasses.replace(ARGS, vocab_size=len(logits))

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, -1)


def test_sampled_frequencies_are_the_top_k_softmax_at_the_temperature():
    """Many draws: every id is among the top k, and each one's frequency is its probability under
    softmax(logits / temperature) restricted to the top k (within 4.5 standard errors)."""
    logits = scaled_model(3)(torch.tensor([[256, 72, 105]]))[0, -1].detach()
    k, temperature, n = 4, 0.5, 20_000
    generator = torch.Generator().manual_seed(0)
    model = FixedLogits(logits)
    draws = torch.tensor([generate_tokens(model, [0], 1, temperature, k, generator)[0] for _ in range(n)])
    top = logits.topk(k)
    assert set(draws.tolist()) <= set(top.indices.tolist())
    expected = torch.softmax(top.values / temperature, -1)
    observed = torch.stack([(draws == i).float().mean() for i in top.indices])
    error = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() <= 4.5 * error).all(), (observed, expected)
    untempered = torch.softmax(top.values, -1)  # the test can tell temperature 0.5 from 1
    assert ((observed - untempered).abs() > 10 * error).any()
