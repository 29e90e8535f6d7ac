"""DeepSeek-V3 (DeepSeek-AI): multi-head latent attention, the first layers dense, then
Mixture-of-Experts layers (shared experts, sigmoid group-limited routing with a routed scaling
factor, auxiliary-loss-free balancing). No multi-token prediction module.
Data parallel (FSDP/HSDP), expert parallel (from the generic parallelize step), tensor parallel
(the latent attention split by heads) and pipeline parallel; no context parallel."""

from raytitan.models.deepseek_v3.args import FLAVORS, ModelArgs
from raytitan.models.deepseek_v3.hf import DeepseekV3HF
from raytitan.models.deepseek_v3.model import Transformer, training_flops
from raytitan.models.deepseek_v3.parallelize import check_layout, parallelize_deepseek_v3
from raytitan.models.moe import moe_metrics
from raytitan.models.qwen3_moe import after_optimizer_step
from raytitan.models.spec import ModelSpec

spec = ModelSpec(
    name="deepseek_v3",
    args=ModelArgs,
    flavors=FLAVORS,
    build=Transformer,
    parallelize=parallelize_deepseek_v3,
    check_layout=check_layout,
    flops_per_token=training_flops,
    hf=DeepseekV3HF(),
    supports_block_causal=True,
    supports_tensor_parallel=True,
    after_optimizer_step=after_optimizer_step,
    metrics=moe_metrics,
)
