"""Qwen3 in Hugging Face's layout (``Qwen3ForCausalLM``, model_type ``qwen3``): parameter names,
the RoPE order of the query/key rows and of the QK-norm weights, config.json, the tied head."""

from __future__ import annotations

import torch

from raytitan.models.hf import HFAdapter
from raytitan.models.qwen3.args import ModelArgs


class Qwen3HF(HFAdapter):
    model_type = "qwen3"
    layer_names = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention.q_norm.weight": "self_attn.q_norm.weight",
        "attention.k_norm.weight": "self_attn.k_norm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    top_names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    compared_keys = HFAdapter.compared_keys + ("head_dim",)

    @staticmethod
    def rotary_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
        """How many heads of features RoPE rotates in ``name`` (raytitan's), or None.

        The QK-norm weights count as one head: the norm scales each feature of a head before
        the rotation, so its head_dim entries follow the same within-head order as the rows of
        wq / wk (pairs here, halves in Hugging Face)."""
        if name.endswith("attention.wq.weight"):
            return n_heads
        if name.endswith("attention.wk.weight"):
            return n_kv_heads
        if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            return 1
        return None

    def hf_config(self, args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                  eos_id: int | None = None) -> dict:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "intermediate_size": args.hidden_dim,
                "max_window_layers": args.n_layers, **self.common_config(args, dtype, bos_id, eos_id)}

    @staticmethod
    def common_config(args, dtype: torch.dtype, bos_id: int | None, eos_id: int | None) -> dict:
        """The config.json keys Qwen3 and Qwen3-MoE share (everything but the feed-forward's)."""
        return {
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": args.max_seq_len,
            "vocab_size": args.vocab_size,
            "tie_word_embeddings": args.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
        }
