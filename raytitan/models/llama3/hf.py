"""Llama 3 in Hugging Face's layout (``LlamaForCausalLM``): parameter names, the RoPE row order
of the query/key projections, config.json, the tied head of Llama 3.2 1B / 3B."""

from __future__ import annotations

import torch

from raytitan.models.hf import HFAdapter
from raytitan.models.llama3.args import ModelArgs


class LlamaHF(HFAdapter):
    model_type = "llama"
    layer_names = {
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
    top_names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }

    @staticmethod
    def rotary_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
        """Heads whose rows RoPE rotates in ``name`` (raytitan's), or None."""
        if name.endswith("attention.wq.weight"):
            return n_heads
        if name.endswith("attention.wk.weight"):
            return n_kv_heads
        return None

    def hf_config(self, args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                  eos_id: int | None = None) -> dict:
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
            "tie_word_embeddings": args.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
        }
