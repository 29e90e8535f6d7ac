"""DeepSeek-V3 in Hugging Face's layout (``DeepseekV3ForCausalLM``, model_type ``deepseek_v3``).

Names: MLA's projections (``q_proj`` or ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), the dense layers' ``mlp``,
the MoE layers' router ``mlp.gate`` whose ``e_score_correction_bias`` is raytitan's load-balancing
bias, the shared experts ``mlp.shared_experts`` and the routed experts one matrix per expert
(``mlp.experts.{e}.gate_proj.weight``) where raytitan stacks them.

RoPE order: the releases (``rope_interleave``, transformers' default) rotate consecutive pairs of
the rope features, as raytitan does, so no row is reordered. A folder written with
``rope_interleave = false`` is refused. The multi-token-prediction layer the releases carry after
the last layer (``model.layers.<num_hidden_layers>.*``) is skipped on import."""

from __future__ import annotations

import re

import torch

from raytitan.models.deepseek_v3.args import ModelArgs
from raytitan.models.hf import HFAdapter, HFFormatError
from raytitan.models.moe_hf import experts_from_hf, experts_to_hf, stack_experts

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _rope_parameters(config: dict) -> dict | None:
    """The rope scaling of a config.json: transformers 5 writes ``rope_parameters`` (with
    rope_type), the releases ``rope_scaling`` (with type); None when plain RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if not rope or rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    return rope


class DeepseekV3HF(HFAdapter):
    model_type = "deepseek_v3"
    layer_names = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wq_a.weight": "self_attn.q_a_proj.weight",
        "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
        "attention.wq_b.weight": "self_attn.q_b_proj.weight",
        "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "moe.router.gate.weight": "mlp.gate.weight",
        "moe.router.expert_bias": "mlp.gate.e_score_correction_bias",
        "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
        "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    top_names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    compared_keys = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "vocab_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                     "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")

    def to_hf(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> dict[str, torch.Tensor]:
        experts = experts_to_hf(name, tensor)
        return experts if experts is not None else super().to_hf(name, tensor, args)

    def from_hf(self, name: str, tensor: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
        if config.get("rope_interleave", True) is False:
            raise HFFormatError("config.json has rope_interleave = false (rope features rotated in halves): raytitan "
                                "reads the releases' interleaved layout only")
        if name.endswith("weight_scale_inv"):
            raise HFFormatError(f"'{name}': the folder holds FP8 block-quantized weights (as the DeepSeek-V3 release "
                                "does); dequantize them to bfloat16 first (DeepSeek's fp8_cast_bf16 conversion)")
        layer = _HF_LAYER.match(name)
        if layer and int(layer.group(1)) >= int(config["num_hidden_layers"]):
            return {}  # the multi-token-prediction module, not built here
        experts = experts_from_hf(name, tensor)
        return experts if experts is not None else super().from_hf(name, tensor, config)

    def complete(self, weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Stack each MoE layer's per-expert matrices into [experts, out, in]; a folder without
        ``e_score_correction_bias`` starts the bias at zero."""
        n = int(config["n_routed_experts"])
        weights = stack_experts(super().complete(weights, config), n)
        for layer in range(int(config.get("first_k_dense_replace", 0)), int(config["num_hidden_layers"])):
            weights.setdefault(f"layers.{layer}.moe.router.expert_bias", torch.zeros(n, dtype=torch.float32))
        return weights

    def check_matches(self, args: ModelArgs, config: dict) -> None:
        """The compared shape keys, then the RoPE scaling factor."""
        config = {**config, "q_lora_rank": config.get("q_lora_rank") or None}
        super().check_matches(args, config)
        rope = _rope_parameters(config)
        factor = None if rope is None else rope.get("factor")
        if factor != args.rope_factor:
            raise HFFormatError(f"config.json has a RoPE scaling factor of {factor}, but the model being trained has "
                                f"{args.rope_factor}: pick the model.flavor that matches the checkpoint")
        if rope is not None and rope.get("mscale", rope.get("mscale_all_dim")) != rope.get("mscale_all_dim"):
            raise HFFormatError("config.json's rope scaling has mscale != mscale_all_dim (cos/sin scaled by their "
                                "ratio): raytitan's DeepSeek-V3 assumes them equal, as the releases have them")

    def hf_config(self, args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                  eos_id: int | None = None) -> dict:
        if args.score_func != "sigmoid":
            raise HFFormatError(f"this DeepSeek-V3 shape routes with {args.score_func} scores; DeepseekV3ForCausalLM "
                                "routes with sigmoid scores only, so it has no Hugging Face DeepSeek-V3 counterpart")
        rope_scaling = None
        if args.rope_factor is not None:
            rope_scaling = {"type": "yarn", "factor": args.rope_factor, "beta_fast": args.rope_beta_fast,
                            "beta_slow": args.rope_beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale,
                            "original_max_position_embeddings": args.rope_original_max_seq_len}
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": args.dim,
            "intermediate_size": args.inter_dim,
            "moe_intermediate_size": args.moe_inter_dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_heads,
            "q_lora_rank": args.q_lora_rank or None,
            "kv_lora_rank": args.kv_lora_rank,
            "qk_nope_head_dim": args.qk_nope_head_dim,
            "qk_rope_head_dim": args.qk_rope_head_dim,
            "v_head_dim": args.v_head_dim,
            "n_routed_experts": args.num_experts,
            "n_shared_experts": args.num_shared_experts,
            "num_experts_per_tok": args.top_k,
            "first_k_dense_replace": args.n_dense_layers,
            "n_group": args.n_expert_groups,
            "topk_group": args.n_limited_groups,
            "norm_topk_prob": args.route_norm,
            "routed_scaling_factor": args.route_scale,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 0,
            "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_interleave": True,
            "max_position_embeddings": args.max_seq_len,
            "vocab_size": args.vocab_size,
            "tie_word_embeddings": args.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
        }
