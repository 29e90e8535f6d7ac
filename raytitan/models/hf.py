"""What every family's Hugging Face adapter shares: reading a model folder's config.json, the
adapter interface, and the RoPE row reordering between raytitan and Hugging Face.

raytitan rotates consecutive pairs of each head's query/key features (Meta's layout); Hugging
Face's rotary models rotate the first half against the second. Exporting reorders the rows of
the query/key projections within each head so both compute the same attention scores.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch


class HFFormatError(ValueError):
    """A Hugging Face folder or tensor that is not a model this family can use."""


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
    """(query heads, key/value heads) of a Hugging Face config.json."""
    try:
        n_heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise HFFormatError("config.json has no num_attention_heads") from None
    return n_heads, int(config.get("num_key_value_heads") or n_heads)


def pairs_to_halves(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from pair order (0,1),(2,3).. to half order (0,d/2),(1,d/2+1).."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def halves_to_pairs(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``pairs_to_halves``."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


class HFAdapter:
    """A family's mapping to and from a Hugging Face ``*ForCausalLM`` folder.

    Subclasses set ``model_type`` and the name tables, and override ``hf_config``; the tensor
    hooks default to "same tensor, renamed". Names here are raytitan's model keys
    (``layers.0.attention.wq.weight``) and Hugging Face's (``model.layers.0.self_attn.q_proj.weight``).
    """

    model_type: str = ""
    layer_names: dict[str, str] = {}  # raytitan name in a block -> Hugging Face name in a layer
    top_names: dict[str, str] = {}  # raytitan top-level name -> Hugging Face name
    compared_keys: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "vocab_size")
    _layer = re.compile(r"^layers\.(\d+)\.(.+)$")
    _hf_layer = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def hf_config(self, args: Any, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
        raise NotImplementedError

    def to_hf_name(self, name: str) -> str:
        if name in self.top_names:
            return self.top_names[name]
        m = self._layer.match(name)
        if m and m.group(2) in self.layer_names:
            return f"model.layers.{m.group(1)}.{self.layer_names[m.group(2)]}"
        raise HFFormatError(f"no Hugging Face name for parameter '{name}'")

    def from_hf_name(self, name: str) -> str:
        for ours, theirs in self.top_names.items():
            if name == theirs:
                return ours
        m = self._hf_layer.match(name)
        if m:
            for ours, theirs in self.layer_names.items():
                if m.group(2) == theirs:
                    return f"layers.{m.group(1)}.{ours}"
        raise HFFormatError(f"'{name}' is not a {self.model_type} weight raytitan knows")

    @staticmethod
    def rotary_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
        """How many heads of features RoPE rotates in raytitan's ``name`` (their rows are reordered
        pairs <-> halves on the way), or None. Rotary families override it."""
        return None

    def to_hf(self, name: str, tensor: torch.Tensor, args: Any) -> dict[str, torch.Tensor]:
        """Hugging Face tensors for one of raytitan's (none to leave it out, e.g. a tied head)."""
        if self.omits(name, args):
            return {}  # saved once, as the embedding (tie_word_embeddings)
        heads = self.rotary_heads(name, getattr(args, "n_heads", None), getattr(args, "kv_heads", None))
        return {self.to_hf_name(name): tensor if heads is None else pairs_to_halves(tensor, heads)}

    @staticmethod
    def omits(name: str, args: Any) -> bool:
        """Whether a folder leaves raytitan's ``name`` out: a head tied to the embedding
        (``args.tie_embeddings``) is saved once, as the embedding, with tie_word_embeddings."""
        return name == "output.weight" and getattr(args, "tie_embeddings", False)

    def from_hf(self, name: str, tensor: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
        """raytitan tensors for one Hugging Face tensor (none to skip it, e.g. a rotary cache)."""
        if name.endswith("rotary_emb.inv_freq"):
            return {}  # a cache some exports carry; recomputed from the config
        ours = self.from_hf_name(name)
        heads = self.rotary_heads(ours, *heads_from_hf_config(config))  # a config without head counts is an error
        return {ours: tensor if heads is None else halves_to_pairs(tensor, heads)}

    def complete(self, weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Fill what a folder leaves implicit: a tied output head is saved once, as the embedding."""
        if "output.weight" not in weights and config.get("tie_word_embeddings") and "tok_embeddings.weight" in weights:
            weights["output.weight"] = weights["tok_embeddings.weight"].clone()
        return weights

    def check_matches(self, args: Any, config: dict) -> None:
        """Raise naming the first config.json value that differs from the shape being trained."""
        if config.get("model_type") not in (self.model_type, None):
            raise HFFormatError(f"config.json has model_type {config.get('model_type')!r}, not "
                                f"{self.model_type!r}: pick the model.name that matches the checkpoint")
        expected = self.hf_config(args, torch.float32)
        for key in self.compared_keys:
            if key in config and config[key] != expected[key]:
                raise HFFormatError(
                    f"Hugging Face config.json has {key} = {config[key]}, but the model being trained has "
                    f"{expected[key]}: pick the model.flavor (and tokenizer) that matches the checkpoint")
        if getattr(args, "tie_embeddings", False) and not config.get("tie_word_embeddings", False):
            raise HFFormatError("config.json has tie_word_embeddings = false (lm_head.weight a matrix of its own), but "
                                "the model being trained ties output.weight to tok_embeddings.weight (one weight): "
                                "the two cannot become one; pick an untied model.flavor")
