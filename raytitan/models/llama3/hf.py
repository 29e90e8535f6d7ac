"""Llama 3 weights in Hugging Face's layout: parameter names, the RoPE row order, config.json.

raytitan rotates consecutive pairs of each head's query/key features (Meta's layout); Hugging
Face's ``LlamaForCausalLM`` rotates the first half against the second. Exporting reorders the
rows of ``wq``/``wk`` within each head so both compute the same attention scores.
"""

from __future__ import annotations

import json
import os
import re

import torch

from raytitan.models.llama3.args import ModelArgs

# raytitan name pattern -> Hugging Face name pattern ({} = layer id)
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class HFFormatError(ValueError):
    """A Hugging Face folder or tensor that is not a Llama this model can use."""


def to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise HFFormatError(f"no Hugging Face name for parameter '{name}'")


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP_NAMES.items():
        if name == theirs:
            return ours
    m = _HF_LAYER.match(name)
    if m:
        for ours, theirs in _LAYER_NAMES.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}"
    raise HFFormatError(f"'{name}' is not a Llama weight raytitan knows (rotary caches and biases are not used)")


def _heads_for(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    if name.endswith("attention.wq.weight"):
        return n_heads
    if name.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def to_hf_tensor(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Rows of each head from pair order (0,1),(2,3).. to half order (0,d/2),(1,d/2+1).."""
    heads = _heads_for(name, n_heads, n_kv_heads)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_tensor(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The inverse of ``to_hf_tensor``; ``name`` is raytitan's."""
    heads = _heads_for(name, n_heads, n_kv_heads)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json for ``transformers.LlamaForCausalLM``."""
    rope_scaling = None
    if args.rope_scaling_factor is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def read_hf_config(folder: str) -> dict:
    """config.json of a Hugging Face model folder that also holds safetensors weights."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise HFFormatError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        raise HFFormatError(f"'{folder}' has no .safetensors weights (other weight formats are not read)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{path} is not valid JSON: {e}") from None


def heads_from_hf_config(config: dict) -> tuple[int, int]:
    """(query heads, key/value heads) of a Hugging Face Llama config.json."""
    if config.get("model_type") not in ("llama", None):
        raise HFFormatError(f"config.json has model_type {config.get('model_type')!r}; only 'llama' is supported")
    try:
        n_heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise HFFormatError("config.json has no num_attention_heads") from None
    return n_heads, int(config.get("num_key_value_heads") or n_heads)


def check_matches(args: ModelArgs, config: dict) -> None:
    """Raise naming the first config.json value that differs from the flavor being trained."""
    expected = hf_config(args, torch.float32)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        if key in config and config[key] != expected[key]:
            raise HFFormatError(
                f"Hugging Face config.json has {key} = {config[key]}, but the model being trained has "
                f"{expected[key]}: pick the model.flavor (and tokenizer) that matches the checkpoint")
