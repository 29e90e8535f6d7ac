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
