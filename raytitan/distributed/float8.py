"""Float8 training through torchao: linear layers compute in float8 with dynamic scales.

Applied to the model on the meta device, before any parallelism, so FSDP shards the converted
layers (and, with ``enable_fsdp_float8_all_gather``, all-gathers them in float8). Parameter
names do not change, so checkpoints load with float8 on or off. ``emulate`` runs the float8
casts with high-precision matmuls: the numerics can be checked on machines (and CPUs) without
float8 hardware.

Mixture-of-Experts models: only ``nn.Linear`` layers are converted (attention projections, dense
feed-forwards, shared experts). The grouped experts (``raytitan.models.moe.GroupedExperts``:
stacked weights and one grouped matmul, not nn.Linear) always compute in the training precision;
the MoE families add ``router.gate`` to ``filter_fqns`` (their ``parallelize``), so experts are
chosen from high-precision scores. This holds with and without expert, tensor and pipeline
parallel (tests/parallel/test_expert_parallel.py checks what is converted).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger("raytitan")

CONVERTER_NAMES = ("quantize.linear.float8", "float8")
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# Recipes torchao has an automatic size filter for (rowwise_with_gw_hp has none).
AUTO_FILTER_RECIPES = ("tensorwise", "rowwise")
# Float8 matmuls (torch._scaled_mm) need Ada or Hopper tensor cores or newer: SM 8.9+.
MIN_CUDA_CAPABILITY = (8, 9)


class Float8HardwareError(RuntimeError):
    """Float8 asked of a GPU that has no float8 matmuls."""


def wanted(converters: list[str]) -> bool:
    return any(name in CONVERTER_NAMES for name in converters)


def module_filter(settings):
    """Which linears to convert: not those named in ``filter_fqns``; with ``auto_filter_small_kn``
    also not those torchao judges too small (or not divisible by 16) to gain from float8.

    The automatic filter is torchao's private ``_auto_filter_for_recipe`` (torchao 0.18, as
    torchtitan uses it): the one private name of this module, checked by tests/test_private_apis.py."""
    if settings.auto_filter_small_kn:
        from torchao.float8 import _auto_filter_for_recipe

        if settings.recipe_name.lower() not in AUTO_FILTER_RECIPES:
            raise ValueError(f"quantize.linear.float8.auto_filter_small_kn supports recipe_name "
                             f"{' or '.join(AUTO_FILTER_RECIPES)}, not {settings.recipe_name!r}")

        return _auto_filter_for_recipe(settings.recipe_name, list(settings.filter_fqns))
    return lambda module, fqn: not any(name in fqn for name in settings.filter_fqns)


def check_hardware(device_type: str, capability: tuple[int, int] | None, emulate: bool) -> None:
    """Refuse real float8 matmuls on a CUDA device older than SM 8.9 (A100, V100, ...): torchao
    would only fail later, inside the first forward, with a kernel error. Emulation and CPUs
    (where torch has its own float8 matmul) pass."""
    if emulate or device_type != "cuda" or capability is None or tuple(capability) >= MIN_CUDA_CAPABILITY:
        return
    major, minor = capability
    raise Float8HardwareError(
        f"Float8 training needs a GPU of compute capability {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} "
        f"or newer (H100, H200, L4, B200...); this one is {major}.{minor}. Drop model.converters, or set "
        "quantize.linear.float8.emulate to check the numerics without the speed-up")


def convert_to_float8(model: torch.nn.Module, settings, device_type: str = "cpu") -> list[str]:
    """Swap the chosen ``nn.Linear`` layers of ``model`` for torchao's Float8Linear, in place.
    ``device_type``: where the model will train (the mesh's); on CUDA the GPU must have float8
    matmuls unless ``settings.emulate``. Returns the names of the converted layers."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    capability = torch.cuda.get_device_capability() if device_type == "cuda" and torch.cuda.is_available() else None
    check_hardware(device_type, capability, settings.emulate)

    if settings.recipe_name == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=settings.enable_fsdp_float8_all_gather,
                                    emulate=settings.emulate)
    else:
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(settings.recipe_name), emulate=settings.emulate)
    before = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    convert_to_float8_training(model, config=config, module_filter_fn=module_filter(settings))
    from torchao.float8.float8_linear import Float8Linear

    converted = sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    logger.info("float8 (%s%s): %d of %d linear layers converted", settings.recipe_name,
                ", emulated" if settings.emulate else "", len(converted), len(before))
    return converted


def precompute_scales(parts: list[torch.nn.Module]) -> None:
    """After the optimizer step: every float8 weight's scale in one all-reduce (tensorwise with
    float8 all-gather), instead of one per weight during the next forward."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
