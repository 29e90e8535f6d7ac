"""torchtitan's DCP step folders: tell them apart, map their weight names, read and write them.

What torchtitan writes (``torchtitan/components/checkpoint.py`` in v0.2.x, ``checkpointer/dcp.py``
in 0.3.x): ``<dump_folder>/<checkpoint.folder>/step-N/``, one DCP checkpoint per step, with
the model's weights flattened to the top level under their module names
(``tok_embeddings.weight``, ``layers.0.attention.wq.weight``, ...: no ``model.`` prefix) and, in
a full save, its ``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` entries
beside them. A seed checkpoint (step 0) and a ``last_save_model_only`` save hold the weights
alone. There is no commit marker: torchtitan counts a step once its ``.metadata`` exists.

Weight names by version, for the families whose spec sets ``torchtitan_names`` (Llama 3):

- 0.2.x: raytitan's own names (raytitan's modules follow torchtitan's), no ``model.`` prefix.
- 0.3.x: the output head is ``lm_head``, and attention's projections sit under ``qkv_linear``
  (``layers.N.attention.qkv_linear.wq.weight``, ``.wk``, ``.wv``). Its fused QKV projection
  is saved split into those three by state-dict hooks. torchtitan's main branch between the fused
  projection (2026-04) and those hooks (2026-06) saved it fused, as ``qkv_linear.wqkv.weight``
  with rows ``[n_kv_heads, n_heads / n_kv_heads + 2, head_dim]`` (the query heads of a key/value
  group, then its key, then its value): that is not a renaming, so only the offline
  ``from-torchtitan`` reads it (splitting it, given the flavor), and a run names that command.
- v0.1 also saved the RoPE table ``freqs_cis``: derived from the shape, skipped.

How a run reads one (``checkpoint.initial_load_path``): in place, through DCP, with the
checkpoint's names as the keys of a state dict whose values are this rank's own (sharded)
parameters. DCP then reads exactly the slices each rank holds, resharding as for any step, and
nothing is copied: a 405B torchtitan step costs what a raytitan step costs. Converting it once into
a raytitan step first (as Hugging Face imports do) would hold the whole model in one process and
write it again. Weights only: the optimizer moments, schedule position and data position
torchtitan saved are in its own formats (0.3.x keeps fused-QKV optimizer moments), so a run
that asks for more is refused at planning rather than half loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from raytitan.components import storage
from raytitan.components.checkpoint.layout import (
    COMMIT_MARKER, STEP_DIR, CheckpointError, read_metadata, write_commit,
)

logger = logging.getLogger("raytitan")

# The entries a torchtitan step keeps beside the model's weights (its Stateful names).
NON_MODEL = ("optimizer", "lr_scheduler", "dataloader", "train_state")
DERIVED = ("freqs_cis",)  # v0.1's RoPE table: recomputed from the shape
NAMES = ("0.2", "0.3")
ACCEPTED = ("A start takes a committed raytitan step folder, a torchtitan step folder, a Hugging Face folder "
            "(checkpoint.initial_load_in_hf) or a torch.save file ending in .pt")  # weight names to write: torchtitan v0.2.x's or 0.3.x's

# raytitan / torchtitan 0.2.x name -> torchtitan 0.3.x name, and back.
_TO_03 = [(re.compile(r"^output\."), "lm_head."),
          (re.compile(r"^(layers\.\d+\.attention\.)(wq|wk|wv)\."), r"\1qkv_linear.\2.")]
_FROM_03 = [(re.compile(r"^lm_head\."), "output."),
            (re.compile(r"^(layers\.\d+\.attention\.)qkv_linear\.(wq|wk|wv)\."), r"\1\2.")]
FUSED = re.compile(r"^(layers\.\d+\.attention\.)qkv_linear\.wqkv\.(weight|bias)$")


def to_torchtitan(name: str, names: str = "0.2") -> str:
    """A raytitan model weight's name in a torchtitan step of version ``names``."""
    if names not in NAMES:
        raise ValueError(f"torchtitan names {names!r}: one of {', '.join(NAMES)}")
    if names == "0.3":
        for pattern, replacement in _TO_03:
            name = pattern.sub(replacement, name)
    return name


def from_torchtitan(name: str) -> str:
    """A torchtitan weight name (either version) as raytitan's."""
    for pattern, replacement in _FROM_03:
        name = pattern.sub(replacement, name)
    return name


def model_entries(metadata: Metadata) -> list[str]:
    """The tensors of a torchtitan step that are model weights (top-level, not its other states)."""
    return [k for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.split(".", 1)[0] not in NON_MODEL and k not in DERIVED]


def is_torchtitan(metadata: Metadata) -> bool:
    """Model weights at the top level, none under raytitan's ``model.``."""
    keys = metadata.state_dict_metadata
    return not any(k.startswith("model.") for k in keys) and bool(model_entries(metadata))


def step_kind(path: str) -> str:
    """``"raytitan"`` (a committed step) or ``"torchtitan"`` (a torchtitan step folder); for
    anything else a ``CheckpointError`` that says what the folder is and what to do."""
    if storage.isfile(storage.join(path, COMMIT_MARKER)):
        return "raytitan"
    if not storage.isfile(storage.join(path, ".metadata")):
        names = storage.listdir(path)
        steps = sorted((int(m.group(1)), n) for n in names if (m := STEP_DIR.match(n)))
        if not names:
            hint = "a file" if storage.isfile(path) else "no such folder"
        elif steps:
            hint = f"it holds step folders: name one, e.g. {storage.join(path, steps[-1][1])}"
        elif "config.json" in names or any(n.endswith(".safetensors") for n in names):
            hint = "it looks like a Hugging Face folder: set checkpoint.initial_load_in_hf = true"
        else:
            hint = "it has no DCP .metadata file"
        raise CheckpointError(f"'{path}' is not a committed checkpoint step folder nor a torchtitan step folder "
                              f"({hint}). {ACCEPTED}")
    metadata = read_metadata(path)
    if is_torchtitan(metadata):
        return "torchtitan"
    if any(k.startswith("model.") for k in metadata.state_dict_metadata):
        raise CheckpointError(f"'{path}' is a raytitan step without its {COMMIT_MARKER} file: its save did not "
                              "complete (a crash mid-save); use an earlier committed step")
    raise CheckpointError(f"'{path}' is a DCP checkpoint without model weights (neither raytitan's model.* nor "
                          "torchtitan's top-level weights): nothing to load")


def check_family(spec: Any) -> None:
    """Only families whose names and tensor layouts are torchtitan's convert by renaming."""
    if not getattr(spec, "torchtitan_names", False):
        raise CheckpointError(f"model {spec.name!r} does not share torchtitan's weight names and layouts "
                              "(its spec leaves torchtitan_names unset): torchtitan steps cannot be read or "
                              "written as this model; go through Hugging Face format if both sides support it")


def weight_names(path: str, metadata: Metadata) -> dict[str, str]:
    """raytitan name -> the torchtitan step's name, for each model weight it holds. A fused QKV
    projection is an error naming the offline command that splits it."""
    names = {}
    for key in model_entries(metadata):
        if FUSED.match(key):
            raise CheckpointError(
                f"{path} stores '{key}' fused (torchtitan's main branch of 2026-04 to 2026-06): that is not a "
                "renaming, so a run cannot read it in place. Split it once with `python -m raytitan.convert "
                f"from-torchtitan {path} DST --flavor FLAVOR` and start from DST")
        ours = from_torchtitan(key)
        if ours in names:
            raise CheckpointError(f"{path} holds both '{names[ours]}' and '{key}' (both are raytitan's '{ours}')")
        names[ours] = key
    return names


def version_of(names: dict[str, str]) -> str:
    return "0.3" if any(ours != theirs for ours, theirs in names.items()) else "0.2"


def match_weights(path: str, metadata: Metadata, shapes: dict[str, tuple[int, ...]],
                  model_keys: set[str] | None = None) -> dict[str, str]:
    """raytitan name -> torchtitan name for every weight in ``shapes`` (this rank's, unprefixed),
    checked: each is there, in that shape, and (given the whole model's names) the step holds no
    weight the model lacks. Errors name the key; nothing is loaded."""
    names = weight_names(path, metadata)
    stored = metadata.state_dict_metadata
    for ours, shape in shapes.items():
        theirs = names.get(ours)
        if theirs is None:
            tried = sorted({ours, to_torchtitan(ours, "0.3")})
            raise CheckpointError(f"torchtitan step {path} has no '{' or '.join(tried)}': it was saved from a "
                                  "different model (another flavor or family)")
        if tuple(stored[theirs].size) != shape:
            raise CheckpointError(f"torchtitan step {path}: '{theirs}' has shape {list(stored[theirs].size)} but "
                                  f"this model's '{ours}' is {list(shape)}: was it saved from another model.flavor "
                                  "or tokenizer (vocabulary)?")
    if model_keys is not None:
        extra = sorted(theirs for ours, theirs in names.items() if ours not in model_keys)
        if extra:
            raise CheckpointError(f"torchtitan step {path} has {len(extra)} weights this model lacks (first: "
                                  f"'{extra[0]}'): was it saved from another model.flavor?")
    return {ours: names[ours] for ours in shapes}


# --------------------------------------------------------------------------- offline conversions


def resolve_step(path: str) -> str:
    """A torchtitan step folder, or the newest ``step-N`` with DCP metadata of a checkpoint folder
    (how torchtitan picks the step it resumes from)."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    steps = sorted(int(m.group(1)) for n in (os.listdir(path) if os.path.isdir(path) else [])
                   if (m := STEP_DIR.match(n)) and os.path.isfile(os.path.join(path, n, ".metadata")))
    if steps:
        return os.path.join(path, f"step-{steps[-1]}")
    raise CheckpointError(f"'{path}' is neither a DCP step folder (with .metadata) nor a folder of step-N folders")


def split_fused(weight: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """torchtitan's fused ``wqkv`` rows [n_kv_heads, n_heads / n_kv_heads + 2, head_dim] as wq, wk, wv."""
    per_group = n_heads // n_kv_heads
    if n_heads % n_kv_heads or weight.shape[0] != (n_heads + 2 * n_kv_heads) * head_dim:
        raise CheckpointError(f"a fused wqkv of {weight.shape[0]} rows does not fit {n_heads} heads, {n_kv_heads} "
                              f"key/value heads of {head_dim}: is --flavor the model it was saved from?")
    rows = weight.reshape(n_kv_heads, per_group + 2, head_dim, *weight.shape[1:])
    return {"wq": rows[:, :per_group].reshape(n_heads * head_dim, *weight.shape[1:]).clone(),
            "wk": rows[:, per_group].reshape(n_kv_heads * head_dim, *weight.shape[1:]).clone(),
            "wv": rows[:, per_group + 1].reshape(n_kv_heads * head_dim, *weight.shape[1:]).clone()}


def _heads(args: Any) -> tuple[int, int, int]:
    try:
        n_heads = args.n_heads
        return n_heads, getattr(args, "kv_heads", None) or args.n_kv_heads or n_heads, args.head_dim
    except AttributeError as e:
        raise CheckpointError(f"cannot split a fused wqkv: the model's args have no {e.name}") from None


def read_weights(path: str, args: Any = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A torchtitan step's model weights under raytitan's names, whole, on the CPU (a fused QKV
    projection split with ``args``' head counts)."""
    from raytitan.components.checkpoint.convert import load_tensors

    metadata = read_metadata(path)
    if not is_torchtitan(metadata):
        raise CheckpointError(f"{path} is not a torchtitan step (no top-level model weights, or raytitan's "
                              "model.* keys)")
    keys = model_entries(metadata)
    weights = {}
    for key, tensor in load_tensors(path, metadata, keys).items():
        tensor = tensor if dtype is None else tensor.to(dtype)
        fused = FUSED.match(key)
        if fused:
            if args is None:
                raise CheckpointError(f"{path} stores '{key}' fused: name the model's --flavor so its heads can "
                                      "be split")
            prefix, kind = fused.groups()
            for name, part in split_fused(tensor, *_heads(args)).items():
                weights[f"{prefix}{name}.{kind}"] = part
        else:
            weights[from_torchtitan(key)] = tensor
    return weights


def import_torchtitan(src: str, out_step_dir: str, model: str = "llama3", flavor: str | None = None,
                      dtype: torch.dtype | None = None) -> str:
    """A torchtitan step (or the newest of its checkpoint folder) as a committed, model-only
    raytitan step that records its family (and, given ``flavor``, its shape for later exports)."""
    from raytitan.components.checkpoint.convert import write_weights_step
    from raytitan.models import get_spec
    from raytitan.models.spec import build_meta

    spec = get_spec(model)
    check_family(spec)
    step = resolve_step(src)
    args = None
    if flavor is not None:
        args = spec.flavor(flavor)
        stored = read_metadata(step).state_dict_metadata
        if "tok_embeddings.weight" in stored:  # sized to the checkpoint's vocabulary, as model_of does
            args = dataclasses.replace(args, vocab_size=stored["tok_embeddings.weight"].size[0])
    weights = read_weights(step, args, dtype)
    if args is not None:
        check_shapes(step, weights, {k: tuple(v.shape) for k, v in build_meta(spec, args).state_dict().items()},
                     f"--flavor {flavor}")
    info = {"model": model, **({"flavor": flavor, "model_args": dataclasses.asdict(args)} if args else {})}
    return write_weights_step(weights, out_step_dir, source=os.path.abspath(step), info=info)


def check_shapes(path: str, weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """The weights read are exactly the model's, in its shapes (the first difference names the key)."""
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path} has no '{name}' (nor its torchtitan 0.3.x name), which {what} has")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: '{name}' has shape {list(weights[name].shape)}, {what} has {list(shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{path} has {len(extra)} weights {what} lacks (first: '{extra[0]}')")


def export_torchtitan(step_path: str, out_dir: str, names: str = "0.2", dtype: torch.dtype | None = None) -> str:
    """A raytitan step's model weights as a torchtitan step folder (DCP, weights at the top level
    under version ``names``' names, no commit marker): torchtitan loads it with
    ``--checkpoint.initial_load_path out_dir``. Written aside, then renamed into place."""
    from raytitan.components.checkpoint.convert import check_replaceable, load_tensors, tensor_keys
    from raytitan.components.checkpoint.layout import check_files, read_commit_at
    from raytitan.models import get_spec, spec_name_of

    metadata = check_files(step_path)
    check_family(get_spec(spec_name_of(read_commit_at(step_path))))
    check_replaceable(out_dir, step_path)
    if os.path.isfile(os.path.join(out_dir, ".metadata")) and \
            {k.split(".", 1)[0] for k in read_metadata(out_dir).state_dict_metadata} & set(NON_MODEL):
        raise CheckpointError(f"the output {out_dir} is a torchtitan training step (it holds optimizer or data "
                              "state); conversions replace their output folder, so choose another one")
    keys = tensor_keys(metadata, "model.")
    if not keys:
        raise CheckpointError(f"{step_path} holds no model weights")
    state = {to_torchtitan(k.removeprefix("model."), names): v if dtype is None else v.to(dtype)
             for k, v in load_tensors(step_path, metadata, keys).items()}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(state, checkpoint_id=tmp, no_dist=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    logger.info("wrote %d weights with torchtitan %s.x names to %s", len(state), names, out_dir)
    return out_dir


def describe(path: str) -> str:
    """One line for logs: what a torchtitan step holds."""
    metadata = read_metadata(path)
    others = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata} & set(NON_MODEL))
    names = weight_names(path, metadata)
    return (f"torchtitan {version_of(names)}.x step, {len(names)} weights"
            + (f" (its {', '.join(others)} not read)" if others else ""))

