"""Qwen3-MoE in Hugging Face's layout (``Qwen3MoeForCausalLM``, model_type ``qwen3_moe``):
Qwen3's attention names and RoPE orders, and the experts as the published folders store them,
one matrix per expert (``mlp.experts.{e}.gate_proj.weight``), where raytitan stacks them.

The load-balancing bias has no Hugging Face counterpart: an export leaves it out (transformers
routes by the scores alone), an import starts it at zero."""

from __future__ import annotations

import re

import torch

from raytitan.models.hf import HFFormatError
from raytitan.models.moe_hf import experts_from_hf, experts_to_hf, stack_experts
from raytitan.models.qwen3.hf import Qwen3HF
from raytitan.models.qwen3_moe.args import ModelArgs

_BIAS = re.compile(r"^layers\.(\d+)\.moe\.router\.expert_bias$")


def num_experts(config: dict) -> int:
    """The releases write ``num_experts``; transformers 5's save_pretrained ``num_local_experts``."""
    n = config.get("num_experts", config.get("num_local_experts"))
    if n is None:
        raise HFFormatError("config.json has no num_experts (nor num_local_experts)")
    return int(n)


class Qwen3MoeHF(Qwen3HF):
    model_type = "qwen3_moe"
    layer_names = {**{k: v for k, v in Qwen3HF.layer_names.items() if not k.startswith("feed_forward.")},
                   "moe.router.gate.weight": "mlp.gate.weight"}
    compared_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob")

    def to_hf(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> dict[str, torch.Tensor]:
        if _BIAS.match(name):
            return {}
        experts = experts_to_hf(name, tensor)
        return experts if experts is not None else super().to_hf(name, tensor, args)

    def from_hf(self, name: str, tensor: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
        experts = experts_from_hf(name, tensor)
        return experts if experts is not None else super().from_hf(name, tensor, config)

    def complete(self, weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Stack each layer's per-expert matrices into [num_experts, out, in] and start every
        layer's load-balancing bias at zero."""
        n = num_experts(config)
        weights = stack_experts(super().complete(weights, config), n)
        for layer in range(int(config["num_hidden_layers"])):
            weights.setdefault(f"layers.{layer}.moe.router.expert_bias", torch.zeros(n, dtype=torch.float32))
        return weights

    def check_matches(self, args: ModelArgs, config: dict) -> None:
        """Qwen3's checks, then: every layer must be MoE (decoder_sparse_step 1, no dense layers)."""
        if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
            raise HFFormatError("config.json has dense layers (decoder_sparse_step != 1 or mlp_only_layers): raytitan's "
                                "qwen3_moe has an MoE feed-forward in every layer, as the releases do")
        super().check_matches(args, {**config, "num_experts": num_experts(config)})

    def hf_config(self, args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None,
                  eos_id: int | None = None) -> dict:
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "intermediate_size": args.moe_inter_dim * args.top_k,  # unused: no dense layer
            "moe_intermediate_size": args.moe_inter_dim,
            "num_experts": args.num_experts,
            "num_experts_per_tok": args.top_k,
            "norm_topk_prob": args.route_norm,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            **self.common_config(args, dtype, bos_id, eos_id),
        }
