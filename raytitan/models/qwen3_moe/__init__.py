"""Qwen3-MoE (Alibaba): Qwen3's attention with a Mixture-of-Experts feed-forward in every layer
(128 experts, 8 active, softmax routing with renormalized top-k weights, no shared expert).
Data parallel (FSDP/HSDP), expert parallel (parallelism.expert_parallel_degree), tensor parallel
(attention; the MoE layers on each rank's sequence shard) and pipeline parallel; no context
parallel."""

from raytitan.models.moe import moe_metrics, update_load_balance_bias
from raytitan.models.qwen3_moe.args import FLAVORS, ModelArgs
from raytitan.models.qwen3_moe.hf import Qwen3MoeHF
from raytitan.models.qwen3_moe.model import Transformer, training_flops
from raytitan.models.qwen3_moe.parallelize import check_layout, parallelize_qwen3_moe
from raytitan.models.spec import ModelSpec


def after_optimizer_step(parts, dp_group) -> None:
    """Move every MoE layer's load-balancing bias, the counts summed over the data-parallel
    ranks so that every replica keeps the same bias. Under expert parallel the counts are still
    those of each rank's own tokens over all experts (counted before dispatch): the sum is global."""
    for part in parts:
        update_load_balance_bias(part, dp_group)


spec = ModelSpec(
    name="qwen3_moe",
    args=ModelArgs,
    flavors=FLAVORS,
    build=Transformer,
    parallelize=parallelize_qwen3_moe,
    check_layout=check_layout,
    flops_per_token=training_flops,
    hf=Qwen3MoeHF(),
    supports_block_causal=True,
    supports_tensor_parallel=True,
    after_optimizer_step=after_optimizer_step,
    metrics=moe_metrics,
)
