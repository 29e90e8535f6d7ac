"""Model families, one folder each (args and flavors, the model, its parallelization, its Hugging
Face adapter), found by ``model.name``: a built-in name, or ``package.module:attribute`` naming a
``ModelSpec`` in the user's own code (importable on every worker)."""

from __future__ import annotations

import importlib
import os
import site
import sys

from raytitan.models.spec import ModelSpec, ModelSpecError

# Built-in families: model.name -> where the spec lives (imported only when asked for).
BUILTIN = {
    "llama3": "raytitan.models.llama3:spec",
    "qwen3": "raytitan.models.qwen3:spec",
    "qwen3_moe": "raytitan.models.qwen3_moe:spec",
    "deepseek_v3": "raytitan.models.deepseek_v3:spec",
}
MODELS = tuple(BUILTIN)


def get_spec(name: str) -> ModelSpec:
    """The spec ``model.name`` selects; ``ModelSpecError`` says why when there is none."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ModelSpecError(f"model.name = {name!r} is not a built-in model ({', '.join(MODELS)}) nor "
                             "'package.module:attribute' naming a ModelSpec in your own code")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"model.name = {name!r}: cannot import {module_name} ({e}); the module must be "
                             "importable from the working directory (or PYTHONPATH) on every worker") from None
    spec = getattr(module, attribute, None)
    if not isinstance(spec, ModelSpec):
        found = "nothing" if spec is None else type(spec).__name__
        raise ModelSpecError(f"model.name = {name!r}: {module_name}.{attribute} is {found}, not a "
                             "raytitan.models.spec.ModelSpec")
    return spec


def source_root(name: str) -> str | None:
    """The folder a worker needs on its import path to import ``model.name``'s module as this
    process did (the folder holding its top-level package or module); None for a built-in family
    or an installed package."""
    if name in BUILTIN:
        return None
    get_spec(name)  # imports it, or says why not
    top = sys.modules[name.partition(":")[0].split(".")[0]]
    location = next(iter(getattr(top, "__path__", [])), None) or top.__file__  # a package's folder, or the file
    root = os.path.dirname(os.path.abspath(location))
    installed = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else root  # an installed package is on every path already


def spec_name_of(marker: dict) -> str:
    """The family a checkpoint's commit marker records (steps written before families were
    recorded are Llama 3)."""
    return marker.get("model", "llama3")


def spec_for_hf(config: dict, name: str | None = None) -> ModelSpec:
    """The family that reads a Hugging Face config.json: ``name``'s, or the built-in family whose
    adapter has its ``model_type``."""
    from raytitan.models.hf import HFFormatError

    if name is not None:
        spec = get_spec(name)
        if spec.hf is None:
            raise HFFormatError(f"model {name!r} has no Hugging Face adapter")
        return spec
    model_type = config.get("model_type")
    for builtin in MODELS:
        spec = get_spec(builtin)
        if spec.hf is not None and spec.hf.model_type == model_type:
            return spec
    known = [get_spec(b).hf.model_type for b in MODELS if get_spec(b).hf is not None]
    raise HFFormatError(f"config.json has model_type {model_type!r}; the built-in families read {', '.join(known)} "
                        "(name your own family's spec with model.name)")
