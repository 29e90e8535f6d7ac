"""Checkpoint folders outside a training run, on one process: read DCP steps, convert them to
and from Hugging Face safetensors or a single torch file, summarize and verify them.

Conversions to Hugging Face and verification read a few tensors at a time, so memory stays
near one output shard, not the whole model.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from raytitan.components.checkpoint import integrity
from raytitan.components.checkpoint.layout import (

    COMMIT_MARKER, STEP_DIR, CheckpointError, root_cause, check_files, committed_steps, read_commit_at, step_dir, write_commit,

)
from raytitan.models import get_spec, spec_for_hf, spec_name_of
from raytitan.models.hf import HFFormatError, read_hf_config
from raytitan.models.spec import ModelSpec, ModelSpecError

logger = logging.getLogger("raytitan")

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def resolve_step_path(path: str) -> str:
    """A committed step folder, or the newest committed step of a checkpoint folder."""
    if os.path.isfile(os.path.join(path, COMMIT_MARKER)):
        return path
    steps = committed_steps(path)
    if steps:
        return step_dir(path, steps[-1])
    raise CheckpointError(f"'{path}' is neither a committed step folder (with {COMMIT_MARKER}) nor a folder "
                          "of committed step-N folders")


def _quiet_load(state: dict, path: str, checked: bool = True) -> None:
    """DCP's load on one process; ``checked``: against the step's checksums, where it has them."""
    reader = integrity.reader(path) if checked else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=path, storage_reader=reader, no_dist=True)


def load_tensors(path: str, metadata: Metadata, keys: list[str], checked: bool = True) -> dict[str, torch.Tensor]:
    """The named tensors (DCP keys, e.g. ``model.norm.weight``), whole, on the CPU; bytes that fail
    the step's checksums are an error naming the key (``checked``)."""
    state = {}
    for key in keys:
        meta = metadata.state_dict_metadata[key]
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    try:
        _quiet_load(state, path, checked)
    except (Exception, CheckpointException) as e:
        if len(keys) > 1:  # find the one that fails
            for key in keys:
                load_tensors(path, metadata, [key], checked)
        raise CheckpointError(f"{path}/{files_of(metadata, keys[0])}: cannot read '{keys[0]}': {root_cause(e)}") from e
    return state


def tensor_keys(metadata: Metadata, prefix: str = "") -> list[str]:
    return [k for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)]


def _nbytes(meta: TensorStorageMetadata, dtype: torch.dtype | None = None) -> int:
    return meta.size.numel() * (dtype or meta.properties.dtype).itemsize


def model_order(key: str) -> tuple:
    """Embedding, then layers in numeric order, then the final norm and output head."""
    m = _LAYER_KEY.match(key)
    if m:
        return (1, int(m.group(1)), key)
    return (0 if "tok_embeddings" in key else 2, 0, key)


def _groups(metadata: Metadata, keys: list[str], max_bytes: int, dtype: torch.dtype | None = None) -> list[list[str]]:
    """Consecutive keys in groups of at most ``max_bytes`` (a bigger tensor gets a group of its own)."""
    groups, current, size = [], [], 0
    for key in keys:
        n = _nbytes(metadata.state_dict_metadata[key], dtype)
        if current and size + n > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    return groups + ([current] if current else [])


def model_of(path: str, flavor: str | None = None, name: str | None = None) -> tuple[ModelSpec, Any]:
    """The model family and shape a step was saved with: from its commit marker, or a named
    flavor sized to the checkpoint's vocabulary. ``name`` overrides the family the marker records."""
    marker = read_commit_at(path)
    try:
        spec = get_spec(name or spec_name_of(marker))
    except ModelSpecError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if flavor is None and "model_args" in marker:
        return spec, spec.args_from_dict(marker["model_args"])
    flavor = flavor or marker.get("flavor")
    if flavor not in spec.flavors:
        raise CheckpointError(f"{path} does not record its model shape: name its flavor ({', '.join(spec.flavors)})")
    vocab = check_files(path).state_dict_metadata["model.tok_embeddings.weight"].size[0]
    return spec, dataclasses.replace(spec.flavors[flavor], vocab_size=vocab)


# --------------------------------------------------------------------------- Hugging Face


def export_hf(step_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 << 30,
              model: tuple[ModelSpec, Any] | None = None, tokenizer_folder: str | None = None) -> str:
    """Write a step's weights as a Hugging Face model folder: config.json, safetensors shards
    (with an index when more than one), and the tokenizer files when given. ``model``: the
    (spec, args) to export as; default what the step records."""
    from safetensors.torch import save_file

    metadata = check_files(step_path)
    marker = read_commit_at(step_path)
    if tokenizer_folder and not os.path.isfile(os.path.join(tokenizer_folder, "tokenizer.json")):
        raise CheckpointError(f"no tokenizer.json in {tokenizer_folder} (the tokenizer folder given)")
    spec, args = model or model_of(step_path)
    if spec.hf is None:
        raise CheckpointError(f"model {spec.name!r} has no Hugging Face adapter: export it with to-torch instead")
    keys = sorted(tensor_keys(metadata, "model."), key=model_order)
    if not keys:
        raise CheckpointError(f"{step_path} holds no model weights")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups = _groups(metadata, keys, max_shard_bytes, dtype)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    for group, name in zip(groups, names):
        tensors = {}
        for key, tensor in load_tensors(step_path, metadata, group).items():
            for hf_name, hf_tensor in spec.hf.to_hf(key.removeprefix("model."), tensor, args).items():
                tensors[hf_name] = hf_tensor.to(dtype).contiguous()
                weight_map[hf_name] = name
                total += tensors[hf_name].nbytes
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        logger.info("wrote %s (%d tensors)", name, len(tensors))
    if len(groups) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(spec.hf.hf_config(args, dtype, marker.get("bos_id"), marker.get("eos_id")), f, indent=2)
    tokenizer_folder = tokenizer_folder or marker.get("hf_assets_path")
    for name in HF_TOKENIZER_FILES:
        if tokenizer_folder and os.path.isfile(os.path.join(tokenizer_folder, name)):
            shutil.copy(os.path.join(tokenizer_folder, name), tmp)
    if marker.get("tokenizer") == "hf" and not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
        where = (f"no {os.path.join(tokenizer_folder, 'tokenizer.json')}" if tokenizer_folder
                 else "the checkpoint records no model.hf_assets_path")
        logger.warning("%s is written without the run's tokenizer (%s): it loads in transformers as weights only; "
                       "pass the folder with the run's tokenizer.json (--tokenizer / tokenizer_folder=) to include it",
                       out_dir, where)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _hf_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def read_hf_weights(folder: str, dtype: torch.dtype = torch.float32, name: str | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's weights under raytitan's names and layout (the family ``name``
    names, or the built-in one that reads the folder's model_type)."""
    from safetensors import safe_open

    config = read_hf_config(folder)
    adapter = spec_for_hf(config, name).hf
    weights = {}
    for file in _hf_files(folder):
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is listed in the index but missing")
        try:
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    for ours, tensor in adapter.from_hf(hf_name, f.get_tensor(hf_name), config).items():
                        weights[ours] = tensor.to(dtype)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return adapter.complete(weights, config)


def import_hf(folder: str, out_step_dir: str, dtype: torch.dtype = torch.float32, name: str | None = None) -> str:
    """A Hugging Face folder as a committed, model-only DCP step folder that any layout loads
    (resharded) through ``checkpoint.initial_load_path``."""
    return write_weights_step(read_hf_weights(folder, dtype, name), out_step_dir, source=os.path.abspath(folder))


def write_weights_step(weights: dict[str, torch.Tensor], out_step_dir: str, source: str,
                       info: dict | None = None) -> str:
    """Model weights by name as a committed, model-only step folder (written aside, then renamed);
    ``info``: more facts for its commit marker (the model family and shape)."""
    check_replaceable(out_step_dir, source)
    tmp = out_step_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": weights}, checkpoint_id=tmp, storage_writer=integrity.writer(tmp), no_dist=True)
    write_commit(tmp, {"step": 0, "world_size": 1, "time": time.time(), "model_only": True,
                       "checksums": integrity.ALGORITHM, **(info or {}), "source": source})
    shutil.rmtree(out_step_dir, ignore_errors=True)
    os.replace(tmp, out_step_dir)
    return out_step_dir


def check_replaceable(out_dir: str, source: str) -> None:
    """A conversion replaces its output folder: refuse when that would delete its own source, a
    checkpoint folder, or a step a run saved (one whose commit marker names no ``source``: not
    an earlier conversion)."""
    out, src = os.path.abspath(out_dir), os.path.abspath(source)
    if out == src or src.startswith(out.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"the output {out_dir} would replace the source {source}: choose another output folder")
    if out.startswith(src.rstrip(os.sep) + os.sep) and os.path.isdir(src):
        raise CheckpointError(f"the output {out_dir} is inside the source {source}: choose a folder outside it")
    if not os.path.isdir(out):
        return
    marker = os.path.join(out, COMMIT_MARKER)
    if (os.path.isfile(marker) and "source" not in read_commit_at(out)) or committed_steps(out):
        raise CheckpointError(f"the output {out_dir} holds a run's checkpoint; conversions replace their output "
                              "folder, so choose another one (or move that checkpoint away yourself)")


# --------------------------------------------------------------------------- torch


def export_torch(step_path: str, out_file: str, model_only: bool = True) -> str:
    """A step as one ``torch.save`` file: the model's weights by name, or (``model_only=False``)
    every saved state as nested dicts."""
    metadata = check_files(step_path)
    if model_only:
        state = {k.removeprefix("model."): v for k, v in
                 load_tensors(step_path, metadata, tensor_keys(metadata, "model.")).items()}
        torch.save(state, out_file)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(step_path, out_file)
    return out_file


def import_torch(file: str, out_step_dir: str) -> str:
    """A ``torch.save`` file of model weights (either form ``export_torch`` writes) as a committed,
    model-only step folder that any layout loads through ``checkpoint.initial_load_path``."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {file} as a torch.save file of weights: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # every state was saved: take the weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold model weights by name (a dict of tensors, or one under 'model')")
    return write_weights_step(state, out_step_dir, source=os.path.abspath(file))


# --------------------------------------------------------------------------- inspection


@dataclasses.dataclass
class StepSummary:
    path: str
    step: int
    committed: bool
    bytes: int
    marker: dict
    damage: str | None = None  # why a committed step cannot be used (an unreadable marker)


def list_steps(folder: str) -> list[StepSummary]:
    """Every step folder, committed or not, oldest first. Reads the markers only: bytes damaged
    inside the data files are found by ``verify``."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"no such checkpoint folder '{folder}'")
    out = []
    for name in os.listdir(folder):
        m = STEP_DIR.match(name)
        if not m:
            continue
        path = os.path.join(folder, name)
        committed = os.path.isfile(os.path.join(path, COMMIT_MARKER))
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*")) + glob.glob(os.path.join(path, ".*"))
                   if os.path.isfile(f))
        marker, damage = {}, None
        if committed:
            try:
                marker = read_commit_at(path)
            except CheckpointError as e:
                damage = str(e)
        out.append(StepSummary(path, int(m.group(1)), committed, size, marker, damage))
    return sorted(out, key=lambda s: s.step)


def state_sizes(metadata: Metadata) -> dict[str, tuple[int, int]]:
    """Per saved state (model, optimizer, ...): (entries, tensor bytes)."""
    out: dict[str, tuple[int, int]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        state = key.split(".", 1)[0]
        n, size = out.get(state, (0, 0))
        out[state] = (n + 1, size + (_nbytes(meta) if isinstance(meta, TensorStorageMetadata) else 0))
    return out


@dataclasses.dataclass
class VerifyReport:
    path: str
    tensors: int
    bytes: int
    non_finite: dict[str, int]
    entries: int = 0  # non-tensor entries (schedule, data position, step), unpickled


def verify(step_path: str, group_bytes: int = 256 << 20,
           checked: bool = True) -> Iterator[tuple[int, int] | VerifyReport]:
    """Read every tensor of a step (a group at a time) and every other entry; yields (bytes done,
    total) as it goes, then a report with the count of NaN/Inf values per tensor that has any.
    Raises naming the file and key that cannot be read (or, ``checked``, fails its checksum)."""
    metadata = check_files(step_path)
    keys = tensor_keys(metadata)
    total = sum(_nbytes(metadata.state_dict_metadata[k]) for k in keys)
    done, non_finite = 0, {}
    for group in _groups(metadata, keys, group_bytes):
        for key, tensor in load_tensors(step_path, metadata, group, checked).items():
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    non_finite[key] = bad
            done += tensor.nbytes
        yield done, total
    tensors = set(keys)
    entries = [k for k in metadata.state_dict_metadata if k not in tensors]
    for key in entries:
        try:
            _quiet_load({key: None}, step_path, checked)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"{step_path}/{files_of(metadata, key)}: cannot read '{key}': {root_cause(e)}") from e
    yield VerifyReport(step_path, len(keys), total, non_finite, len(entries))


def files_of(metadata: Metadata, key: str) -> str:
    """The data file(s) that hold ``key``."""
    return ", ".join(sorted({info.relative_path for index, info in metadata.storage_data.items() if index.fqn == key}))
