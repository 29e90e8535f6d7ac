"""Sample text from a checkpoint on one process: a quick look at what a run learned.

Plain autoregressive decoding that recomputes the whole prefix per token (no KV cache): meant
for a few dozen tokens in a notebook, not for serving.
"""

from __future__ import annotations

import os

import torch

from raytitan.components.checkpoint.layout import CheckpointError, check_files, read_commit_at
from raytitan.components.checkpoint.convert import load_tensors, model_of, resolve_step_path, tensor_keys
from raytitan.components.data.tokenizer import ByteTokenizer, HFTokenizer
from raytitan.models.spec import build_meta


def load_model(checkpoint: str, device: str | torch.device = "cpu",
               tokenizer_folder: str | None = None) -> tuple[torch.nn.Module, ByteTokenizer | HFTokenizer]:
    """The model and tokenizer of a step folder (or the newest step of a checkpoint folder).

    ``tokenizer_folder``: a folder with the run's tokenizer.json, for a run trained with the
    Hugging Face tokenizer whose ``model.hf_assets_path`` has moved (or is not on this machine)."""
    path = resolve_step_path(checkpoint)
    (spec, args), marker = model_of(path), read_commit_at(path)
    metadata = check_files(path)
    weights = load_tensors(path, metadata, tensor_keys(metadata, "model."))
    model = build_meta(spec, args).to_empty(device=device)
    model.init_weights(buffer_device=torch.device(device))  # buffers (e.g. rotary tables); weights follow
    model.load_state_dict({k.removeprefix("model."): v.float() for k, v in weights.items()})
    model.eval()
    return model, checkpoint_tokenizer(path, marker, tokenizer_folder)


def checkpoint_tokenizer(path: str, marker: dict, tokenizer_folder: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer the run of step folder ``path`` trained with (its commit ``marker`` says
    which). A Hugging Face tokenizer whose files cannot be found is an error: the byte tokenizer
    would turn the model's ids into garbage without a word."""
    if marker.get("tokenizer", "byte") == "byte" and not tokenizer_folder:
        return ByteTokenizer()
    folder = tokenizer_folder or marker.get("hf_assets_path")
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return HFTokenizer(folder)
    if tokenizer_folder:
        problem = f"no tokenizer.json in {tokenizer_folder} (the tokenizer_folder given)"
    elif folder:
        problem = f"its tokenizer is not where the run had it: no {os.path.join(folder, 'tokenizer.json')}"
    else:
        problem = "the checkpoint records no model.hf_assets_path to find its tokenizer.json in"
    raise CheckpointError(
        f"{path} was trained with the Hugging Face tokenizer (model.tokenizer = 'hf'), but {problem}; "
        "pass tokenizer_folder='<folder with the run's tokenizer.json>' to generate / load_model")


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, generator: torch.Generator | None = None,
                    stop: int | None = None) -> list[int]:
    """Greedy (temperature 0) or sampled continuation of ``prompt``'s token ids."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.args.max_seq_len:])[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if token == stop:
            break
        new.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
    return new


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, device: str = "cpu", tokenizer_folder: str | None = None) -> str:
    """``prompt`` continued by the model in ``checkpoint`` (the text after the prompt);
    ``tokenizer_folder`` as in ``load_model``."""
    model, tokenizer = load_model(checkpoint, device, tokenizer_folder)
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode_batch([prompt])[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, generator, stop=tokenizer.eos_id)
    return tokenizer.decode(ids)
