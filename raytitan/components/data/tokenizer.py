"""Tokenizers: a file-free byte tokenizer, and Hugging Face tokenizer.json files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used; the message names the file and what to do (a config error)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then BOS, EOS and PAD."""

    name = "byte"  # the model.tokenizer value that builds it
    folder = None
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json (e.g. Llama 3's), with BOS/EOS read from tokenizer_config.json when present."""

    name = "hf"

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.hf_assets_path: no tokenizer.json in '{folder}'")
        self.folder = folder
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            raise TokenizerError(f"model.hf_assets_path: cannot read {path} as a Hugging Face tokenizer ({e}); "
                                 "replace it with the model's tokenizer.json") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = {"bos": None, "eos": None}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except ValueError as e:  # not JSON, or not UTF-8
                raise TokenizerError(f"model.hf_assets_path: {config_path} is not valid JSON ({e}); replace it with "
                                     "the model's tokenizer_config.json, or remove it") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"model.hf_assets_path: {config_path} holds a JSON {type(cfg).__name__}, not an "
                                     "object; replace it with the model's tokenizer_config.json, or remove it")
            for k in names:
                tok = cfg.get(f"{k}_token")
                names[k] = tok.get("content") if isinstance(tok, dict) else tok
        self.bos_id = self._token_id(names["bos"], ("<|begin_of_text|>", "<s>", "<bos>"))
        self.eos_id = self._token_id(names["eos"], ("<|end_of_text|>", "</s>", "<eos>"))
        self.pad_id = self.eos_id

    def _token_id(self, name: str | None, fallbacks: tuple[str, ...]) -> int:
        for candidate in ((name,) if name else ()) + fallbacks:
            tid = self._tok.token_to_id(candidate)
            if tid is not None:
                return tid
        raise TokenizerError(f"model.hf_assets_path: the tokenizer in {self.folder} has none of the special tokens "
                             f"{[t for t in (name, *fallbacks) if t]}; name its BOS/EOS in tokenizer_config.json "
                             "(bos_token, eos_token)")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


TOKENIZERS = ("auto", "byte", "hf")  # model.tokenizer


def has_tokenizer_file(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "tokenizer.json"))


def resolve_tokenizer(model_config) -> str:
    """The tokenizer ``model.tokenizer`` means: 'byte' or 'hf'. 'auto' (the default) is 'hf' when
    ``model.hf_assets_path`` is set (as torchtitan's configs set it, for their tokenizer) and
    'byte' when it is not. A folder without tokenizer.json is an error under 'auto' too: training
    on bytes a model meant for that tokenizer would be a silently wrong run."""
    choice = model_config.tokenizer.lower()
    if choice == "auto":
        if not model_config.hf_assets_path:
            return "byte"
        if not has_tokenizer_file(model_config.hf_assets_path):
            raise ValueError(f"model.hf_assets_path '{model_config.hf_assets_path}' has no tokenizer.json, and "
                             "model.tokenizer = 'auto' takes the tokenizer from there: put the tokenizer's files "
                             "(tokenizer.json, tokenizer_config.json) in it, or set model.tokenizer = 'byte' to "
                             "train on bytes")
        return "hf"
    if choice not in TOKENIZERS:
        raise ValueError(f"model.tokenizer: unknown tokenizer '{model_config.tokenizer}'; use one of "
                         f"{', '.join(TOKENIZERS)}")
    return choice


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer to build: the ``model`` config's tokenizer keys alone, resolved."""

    tokenizer: str  # 'byte' or 'hf'
    hf_assets_path: str | None

    @classmethod
    def of(cls, model_config) -> TokenizerSpec:
        return cls(resolve_tokenizer(model_config), model_config.hf_assets_path)


def build_tokenizer(model_config) -> ByteTokenizer | HFTokenizer:
    """From the ``model`` config section (or a TokenizerSpec); ``.name`` says which was built."""
    if resolve_tokenizer(model_config) == "byte":
        return ByteTokenizer()
    if not model_config.hf_assets_path:
        raise ValueError("model.tokenizer = 'hf' needs model.hf_assets_path (folder with tokenizer.json)")
    return HFTokenizer(model_config.hf_assets_path)
