"""Qwen3 dense (Alibaba): Llama's block with QK-norm (an RMSNorm on each query and key head
before RoPE), a head width independent of the model width, rope theta 1e6, and an output head
tied to the embedding in the small releases."""

from raytitan.models.qwen3.args import FLAVORS, ModelArgs
from raytitan.models.qwen3.hf import Qwen3HF
from raytitan.models.qwen3.model import Transformer, training_flops
from raytitan.models.qwen3.parallelize import check_layout, parallelize_qwen3
from raytitan.models.spec import ModelSpec

spec = ModelSpec(
    name="qwen3",
    args=ModelArgs,
    flavors=FLAVORS,
    build=Transformer,
    parallelize=parallelize_qwen3,
    check_layout=check_layout,
    flops_per_token=training_flops,
    hf=Qwen3HF(),
    supports_tensor_parallel=True,
    supports_context_parallel=True,
    supports_block_causal=True,
)
