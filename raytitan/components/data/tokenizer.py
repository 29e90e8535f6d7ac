"""Tokenizers: a file-free byte tokenizer, and Hugging Face tokenizer.json files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then BOS, EOS and PAD."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json (e.g. Llama 3's), with BOS/EOS read from tokenizer_config.json when present."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.hf_assets_path: no tokenizer.json in '{folder}'")
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = {"bos": None, "eos": None}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                cfg = json.load(f)
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
        raise ValueError(f"tokenizer has none of the special tokens {[name, *fallbacks]}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


TOKENIZERS = ("byte", "hf")  # model.tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer to build: the ``model`` config's tokenizer keys alone."""

    tokenizer: str
    hf_assets_path: str | None

    @classmethod
    def of(cls, model_config) -> TokenizerSpec:
        return cls(model_config.tokenizer, model_config.hf_assets_path)


def build_tokenizer(model_config) -> ByteTokenizer | HFTokenizer:
    """From the ``model`` config section (or a TokenizerSpec)."""
    if model_config.tokenizer == "byte":
        return ByteTokenizer()
    if model_config.tokenizer == "hf":
        if not model_config.hf_assets_path:
            raise ValueError("model.tokenizer = 'hf' needs model.hf_assets_path (folder with tokenizer.json)")
        return HFTokenizer(model_config.hf_assets_path)
    raise ValueError(f"model.tokenizer: unknown tokenizer '{model_config.tokenizer}'; use one of {', '.join(TOKENIZERS)}")
