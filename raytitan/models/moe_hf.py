"""Routed experts in Hugging Face's layout, for the MoE families' adapters: the published folders
(and transformers' ``save_pretrained``) store one matrix per expert,
``model.layers.{l}.mlp.experts.{e}.gate_proj.weight``; raytitan stacks each layer's experts into
one ``[num_experts, out, in]`` weight per projection (``layers.{l}.moe.experts.w1``)."""

from __future__ import annotations

import re

import torch

from raytitan.models.hf import HFFormatError

# raytitan's stacked expert weight -> the per-expert Hugging Face matrix it holds.
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_OURS = re.compile(r"^layers\.(\d+)\.moe\.experts\.(w[123])$")
_HF = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PART = "{}#{}"  # one expert's matrix on import, until ``stack_experts`` stacks its layer's


def experts_to_hf(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A stacked expert weight as its per-expert matrices; None for any other name."""
    m = _OURS.match(name)
    if m is None:
        return None
    layer, w = m.groups()
    return {f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_NAMES[w]}.weight": tensor[e] for e in range(tensor.shape[0])}


def experts_from_hf(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One expert's matrix under a partial name (stacked later); None for a name that is not an
    expert's. Another expert layout (fused, quantized) is an error naming the one read."""
    m = _HF.match(name)
    if m:
        layer, expert, hf = m.groups()
        w = next(k for k, v in EXPERT_NAMES.items() if v == hf)
        return {_PART.format(f"layers.{layer}.moe.experts.{w}", expert): tensor}
    if ".mlp.experts." in name:
        raise HFFormatError(f"'{name}': raytitan reads the published per-expert layout "
                            "(mlp.experts.<e>.gate_proj.weight), as transformers' save_pretrained writes it")
    return None


def stack_experts(weights: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Replace the partial names ``experts_from_hf`` gave by each layer's stacked weights."""
    for key in sorted({k.partition("#")[0] for k in weights if "#" in k}):
        missing = [e for e in range(num_experts) if _PART.format(key, e) not in weights]
        if missing:
            raise HFFormatError(f"{key}: experts {missing[:5]} missing from the folder ({num_experts} expected)")
        weights[key] = torch.stack([weights.pop(_PART.format(key, e)) for e in range(num_experts)])
    return weights
