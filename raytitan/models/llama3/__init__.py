"""Llama 3.1 / 3.2 (Meta): grouped-query attention, SwiGLU, RMSNorm, RoPE with long-context
scaling."""

from raytitan.models.llama3.args import FLAVORS, ModelArgs
from raytitan.models.llama3.hf import LlamaHF
from raytitan.models.llama3.model import Transformer, flops_per_token
from raytitan.models.llama3.parallelize import check_layout, parallelize_llama
from raytitan.models.spec import ModelSpec, count_params


def training_flops(args: ModelArgs, model, seq_len: int) -> int:
    return flops_per_token(args, *count_params(model), seq_len)


spec = ModelSpec(
    name="llama3",
    args=ModelArgs,
    flavors=FLAVORS,
    build=Transformer,
    parallelize=parallelize_llama,
    check_layout=check_layout,
    flops_per_token=training_flops,
    hf=LlamaHF(),
    torchtitan_names=True,
    supports_tensor_parallel=True,
    supports_context_parallel=True,
    supports_block_causal=True,
)
