import dataclasses

import torch

import raytitan
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState
from raytitan.models.llama3.args import FLAVORS
from raytitan.models.llama3.model import Transformer
from raytitan.tools.sampling import generate_tokens, load_model

ARGS = FLAVORS["tiny"].with_vocab(259)


def saved_model(folder) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    info = {"model_args": dataclasses.asdict(ARGS), "tokenizer": "byte", "bos_id": 256, "eos_id": 257}
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
