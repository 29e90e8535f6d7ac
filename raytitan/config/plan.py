"""Check a config against the world it will run on, once, before any worker starts.

``plan_run`` turns a config plus a world size into every derived value the workers need
(degrees, batch split, model shape, shard list), or raises ``ConfigError`` naming the key.
Workers call it again on their side: the derivation lives in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Any

from raytitan.components import storage
from raytitan.components.checkpoint.manager import ASYNC_MODES, LOADABLE
from raytitan.components.checkpoint.layout import CheckpointError, read_metadata
from raytitan.components.checkpoint.torchtitan import check_family, step_kind, weight_names
from raytitan.config.job import SECTIONS, Checkpoint, ConfigError, JobConfig, _base_type, section
from raytitan.components.data.sources import (
    C4_TEST_DOCS, DATASETS, DataSourceError, check_enough_data, resolve_shards,
)
from raytitan.components.data.tokenizer import TOKENIZERS, build_tokenizer, has_tokenizer_file
from raytitan.components.metrics import PROGRESS_BAR_MODES
from raytitan.components.optimizer import DECAY_TYPES, IMPLEMENTATIONS, ON_NONFINITE, OPTIMIZERS
from raytitan.distributed.dims import ParallelDims, ParallelismError
from raytitan.distributed.precision import DTYPES, PARAM_DTYPES, REDUCE_DTYPES, RESHARD_AFTER_FORWARD
from raytitan.models import get_spec
from raytitan.models.hf import HFFormatError, read_hf_config
from raytitan.models.spec import ModelSpec, ModelSpecError
from raytitan.distributed.activation_checkpoint import MODES as AC_MODES, ActivationCheckpointError, check_option
from raytitan.distributed.compile import COMPONENTS
from raytitan.distributed.attention import ATTN_MASK_TYPES
from raytitan.distributed.context import ROTATE_METHODS
from raytitan.distributed.float8 import AUTO_FILTER_RECIPES, CONVERTER_NAMES, RECIPES
from raytitan.distributed.pipeline import SCHEDULES, PipelineError, microbatches, num_stages, stage_layers

logger = logging.getLogger("raytitan")

# Each choice list lives with its owner; this table only says which key each one checks.
CHOICES = {
    "model.tokenizer": TOKENIZERS,
    "model.attn_mask_type": ATTN_MASK_TYPES,
    "optimizer.name": tuple(OPTIMIZERS),
    "optimizer.implementation": IMPLEMENTATIONS,
    "lr_scheduler.decay_type": DECAY_TYPES,
    "training.on_nonfinite": ON_NONFINITE,
    "training.mixed_precision_param": PARAM_DTYPES,
    "training.mixed_precision_reduce": REDUCE_DTYPES,
    "training.dataset": DATASETS,
    "validation.dataset": DATASETS,
    "parallelism.fsdp_reshard_after_forward": RESHARD_AFTER_FORWARD,
    "parallelism.pipeline_parallel_schedule": tuple(SCHEDULES),
    "parallelism.context_parallel_rotate_method": ROTATE_METHODS,
    "checkpoint.async_mode": ASYNC_MODES,
    "checkpoint.export_dtype": tuple(DTYPES),
    "metrics.progress_bar": PROGRESS_BAR_MODES,
    "activation_checkpoint.mode": AC_MODES,
    "quantize.linear.float8.recipe_name": RECIPES,
}
# A run name is one folder inside the storage root: nothing that climbs out of it or needs quoting.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


# Synthetic validation shards use their own seed, so they are never the training shards.
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class RunPlan:
    dims: ParallelDims  # over the active ranks
    world_size: int  # all ranks; ranks >= dims.world_size idle (elastic worlds that fit no layout fully)
    model_args: Any  # the model family's args dataclass, sized to the tokenizer and seq_len
    global_batch_size: int
    local_batch_size: int
    accumulation_steps: int
    shards: list[str]
    validation_shards: list[str]


def _get(config: JobConfig, key: str):
    path, _, name = key.rpartition(".")
    return getattr(section(config, path), name)


def check_values(config: JobConfig) -> None:
    """World-independent checks: choices, signs, ranges, files."""
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices and value.lower() not in [c.lower() for c in choices]:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")
    spec = model_spec(config)
    try:
        spec.flavor(config.model.flavor)
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None
    if config.model.attn_mask_type == "block_causal" and not spec.supports_block_causal:
        raise ConfigError(f"model.name = {config.model.name!r} does not support block-causal attention (its spec "
                          "leaves supports_block_causal unset): set model.attn_mask_type = 'causal'")
    if spec.hf is None and (config.checkpoint.initial_load_in_hf or config.checkpoint.last_save_in_hf):
        raise ConfigError(f"model.name = {config.model.name!r} has no Hugging Face adapter: "
                          "checkpoint.initial_load_in_hf and last_save_in_hf need one")
    check_numbers(config)
    check_seq_len(config, spec)
    check_run_folder(config)
    check_checkpoint(config.checkpoint, config.run_dir, config.model.name)
    check_speed_features(config)
    if config.model.hf_assets_path and not os.path.isdir(config.model.hf_assets_path):
        raise ConfigError(f"model.hf_assets_path: no such folder '{config.model.hf_assets_path}'")


def check_numbers(config: JobConfig) -> None:
    """Every numeric key within the range its field declares (``opt(..., allowed)`` in job.py);
    NaN and infinity are outside every range. Then the limits that involve two keys."""
    for path, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value, allowed = getattr(section(config, path), f.name), f.metadata.get("allowed")
            if value is None or _base_type(hints[f.name]) not in (int, float):
                continue
            if allowed is not None and value not in allowed:
                what = "is not a finite number" if not math.isfinite(value) else "is out of range"
                optional = " (or unset)" if _base_type(hints[f.name]) is not hints[f.name] else ""
                raise ConfigError(f"{path}.{f.name} = {value!r} {what}: it takes {allowed}{optional}; set "
                                  f"--{path}.{f.name} (or the TOML key) to a value within that")
    for name, amount in config.ray.resources_per_worker.items():
        if not (math.isfinite(amount) and amount >= 0):
            raise ConfigError(f"ray.resources_per_worker: {name} = {amount!r} must be a finite amount >= 0; fix "
                              "it in K=V,K=V (or the TOML table)")
    fault = config.fault
    if fault.seed < 0 and fault.kill_step > config.training.steps:
        raise ConfigError(f"fault.kill_step = {fault.kill_step} is past training.steps = {config.training.steps}: "
                          "the fault would never fire; pick a step in [1, training.steps] (or -1 for none)")
    if config.ray.max_workers != -1 and not config.ray.elastic:
        raise ConfigError(f"ray.max_workers = {config.ray.max_workers} needs an elastic run (ray.min_workers >= 1); "
                          "a fixed-size run has ray.num_workers workers: set that instead, or ray.max_workers = -1")


def check_seq_len(config: JobConfig, spec: ModelSpec) -> None:
    """training.seq_len within the flavor's context (``max_seq_len`` of its args, what its RoPE
    settings are made for), unless the run says it means to go beyond it."""
    longest = getattr(spec.flavor(config.model.flavor), "max_seq_len", None)
    seq = config.training.seq_len
    if longest is not None and seq > longest and not config.training.allow_seq_len_above_model_max:
        raise ConfigError(f"training.seq_len = {seq} is above the longest context of {spec.name} "
                          f"{config.model.flavor} (max_seq_len {longest}, what its RoPE settings are made for); it "
                          f"takes 1 to {longest}: lower it, or set training.allow_seq_len_above_model_max = true to "
                          "train longer sequences anyway")


def check_run_folder(config: JobConfig) -> None:
    """The run name is one safe path component, and a local storage root is (or can become) a
    writable folder. Object stores are checked by their first write."""
    name = config.run_name
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        key = f"ray.name = {name!r}" if config.ray.name is not None else \
            f"the run name {name!r} (from model.name and model.flavor)"
        raise ConfigError(f"{key} is not one folder name: it takes letters, digits, '.', '_' and '-' (not '.' or "
                          "'..', no '/'); set --ray.name to such a name")
    key = "ray.storage_path" if config.ray.storage_path else "job.dump_folder"
    root = config.ray.storage_path or config.job.dump_folder
    if storage.is_remote(root):
        return
    path = os.path.abspath(os.path.expanduser(root.removeprefix("file://").split("?", 1)[0]))
    for folder, what in ((path, "it"), (os.path.join(path, name), f"the run folder {name!r} in it")):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{key} = {root!r}: {what} is a file ({folder}), not a folder; point {key} at a "
                              "folder (or set another ray.name)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} = {root!r}: {existing} is not a folder this process can write to; point {key} "
                          "at a writable folder")


def check_speed_features(config: JobConfig) -> None:
    """Activation checkpointing, compile and Float8 settings that name nothing or cannot combine."""
    ac = config.activation_checkpoint
    try:
        check_option(ac.mode, ac.selective_ac_option)
    except ActivationCheckpointError as e:
        raise ConfigError(str(e)) from None
    unknown = [c for c in config.compile.components if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"compile.components: {', '.join(unknown)} not among {', '.join(COMPONENTS)}")
    unknown = [c for c in config.model.converters if c not in CONVERTER_NAMES]
    if unknown:
        raise ConfigError(f"model.converters: {', '.join(unknown)} unknown; the one converter is quantize.linear.float8")
    f8 = config.float8
    if f8.recipe_name != "tensorwise" and f8.enable_fsdp_float8_all_gather:
        raise ConfigError("quantize.linear.float8.enable_fsdp_float8_all_gather needs recipe_name = 'tensorwise'")
    if f8.auto_filter_small_kn and f8.recipe_name.lower() not in AUTO_FILTER_RECIPES:
        raise ConfigError(f"quantize.linear.float8.auto_filter_small_kn: torchao has no size filter for recipe_name = "
                          f"{f8.recipe_name!r} (only {', '.join(AUTO_FILTER_RECIPES)}); turn it off and list the "
                          "layers to keep in high precision in filter_fqns")
    if f8.precompute_float8_dynamic_scale_for_fsdp and not f8.enable_fsdp_float8_all_gather:
        raise ConfigError("quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp needs "
                          "enable_fsdp_float8_all_gather")


def check_checkpoint(c: Checkpoint, run_dir: str, model_name: str | None = None) -> None:
    path = c.initial_load_path
    torch_file = bool(path) and path.endswith((".pt", ".pth"))
    if storage.is_remote(run_dir) and (c.initial_load_in_hf or c.last_save_in_hf or torch_file):
        raise ConfigError("checkpoint.initial_load_in_hf, last_save_in_hf and an initial_load_path .pt file need "
                          f"ray.storage_path on a filesystem, not an object store ({run_dir}); convert offline with "
                          "python -m raytitan.convert")
    unknown = [name for name in c.exclude_from_loading if name not in LOADABLE]
    if unknown:
        raise ConfigError(f"checkpoint.exclude_from_loading: {', '.join(unknown)} not among {', '.join(LOADABLE)}")
    if c.initial_load_in_hf:
        if not path:
            raise ConfigError("checkpoint.initial_load_in_hf needs checkpoint.initial_load_path (a Hugging Face folder)")
        if not c.initial_load_model_only:
            raise ConfigError("checkpoint.initial_load_in_hf loads weights only: set checkpoint.initial_load_model_only")
        try:
            read_hf_config(path)
        except HFFormatError as e:
            raise ConfigError(f"checkpoint.initial_load_path: {e}") from None
    elif torch_file:
        if "://" in path or not os.path.isfile(path):
            raise ConfigError(f"checkpoint.initial_load_path: no such file '{path}' (a .pt path is read as a "
                              "torch.save file of weights, e.g. from python -m raytitan.convert to-torch)")
        if not c.initial_load_model_only:
            raise ConfigError("checkpoint.initial_load_path: a .pt file gives weights only: set "
                              "checkpoint.initial_load_model_only")
    elif path:
        # A committed raytitan step, or a torchtitan step folder (weights read in place, by name).
        try:
            if step_kind(path) == "torchtitan":
                weight_names(path, read_metadata(path))  # a fused QKV projection needs converting first
                if not c.initial_load_model_only:
                    raise CheckpointError(f"{path} is a torchtitan step; raytitan reads its model weights only (its "
                                          "optimizer, schedule and data position are in torchtitan's formats): set "
                                          "checkpoint.initial_load_model_only = true")
                spec = None
                try:
                    spec = get_spec(model_name) if model_name else None
                except ModelSpecError:
                    pass  # the model's own check names it
                if spec is not None:
                    check_family(spec)
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.initial_load_path: {e}") from None


def model_shape(config: JobConfig, spec: ModelSpec, tokenizer, hf_config: dict | None) -> tuple[Any, list]:
    """The flavor's args at ``training.seq_len`` with the vocabulary of the tokenizer in use, and
    what to tell the user about it: (log level, message) pairs.

    The vocabulary is the tokenizer's, whatever the flavor publishes (a published vocabulary of
    another size is said, once). The one exception is a run that starts from Hugging Face weights
    (``checkpoint.initial_load_in_hf``): the model takes their vocabulary, padding rows included,
    which must hold every id the tokenizer gives."""
    flavor = spec.flavor(config.model.flavor)
    n = tokenizer.vocab_size
    which = f"{tokenizer.folder}/tokenizer.json" if tokenizer.folder else "bytes"
    notes = []
    if config.model.tokenizer.lower() == "auto" and tokenizer.folder:
        notes.append((logging.INFO, f"tokenizer: the Hugging Face tokenizer in model.hf_assets_path {tokenizer.folder} "
                                    f"({n} tokens; model.tokenizer = 'auto')"))
    elif tokenizer.folder is None and has_tokenizer_file(config.model.hf_assets_path):
        notes.append((logging.WARNING, f"model.tokenizer = 'byte': the tokenizer.json in model.hf_assets_path "
                                       f"{config.model.hf_assets_path} is not used (model.tokenizer = 'auto' or "
                                       "'hf' trains with it)"))
    vocab = n
    if hf_config is not None and isinstance(hf_config.get("vocab_size"), int):
        vocab = hf_config["vocab_size"]
        source = f"the Hugging Face model in checkpoint.initial_load_path {config.checkpoint.initial_load_path}"
        if vocab < n:
            raise ConfigError(f"{source} has a vocabulary of {vocab}, smaller than the tokenizer's ({which}: {n}): "
                              "its embedding has no row for the tokenizer's highest ids; use the tokenizer it was "
                              "trained with (model.hf_assets_path)")
        if vocab != n:
            notes.append((logging.WARNING, f"{source} has a vocabulary of {vocab}; the tokenizer ({which}) has {n}: "
                                           f"training with the checkpoint's {vocab} (rows {n} and up are never "
                                           "input tokens)"))
    elif flavor.vocab_size is not None and flavor.vocab_size != n:
        notes.append((logging.WARNING, f"{spec.name} {config.model.flavor} publishes a vocabulary of "
                                       f"{flavor.vocab_size}; the tokenizer ({which}) has {n}: training with {n} "
                                       "(the model's vocabulary follows the tokenizer)"))
    return dataclasses.replace(flavor, vocab_size=vocab, max_seq_len=config.training.seq_len), notes


def model_spec(config: JobConfig) -> ModelSpec:
    try:
        return get_spec(config.model.name)
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None


def check_layout(config: JobConfig, dims: ParallelDims, args: Any, local_batch: int) -> None:
    """Tensor, context and pipeline parallel constraints that the model shape must meet."""
    p, seq, spec = config.parallelism, config.training.seq_len, model_spec(config)
    for degree, supported, what in ((dims.tp, spec.supports_tensor_parallel, "tensor"),
                                    (dims.cp, spec.supports_context_parallel, "context")):
        if degree > 1 and not supported:
            raise ConfigError(f"model.name = {config.model.name!r} does not support {what} parallel: set "
                              f"parallelism.{what}_parallel_degree = 1")
    if dims.ep > 1:
        check_expert_parallel(config, dims, args)
    check_aux_loss(config, dims, args)
    if spec.check_layout is not None:
        try:
            spec.check_layout(args, dims)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if dims.cp > 1 and config.model.attn_mask_type == "block_causal":
        raise ConfigError("model.attn_mask_type = 'block_causal' does not combine with context parallel (its ring "
                          "attention is causal over whole rows): set parallelism.context_parallel_degree = 1 or "
                          "model.attn_mask_type = 'causal'")
    if dims.cp > 1 and seq % (2 * dims.cp * dims.tp):
        raise ConfigError(f"training.seq_len {seq} is not divisible by 2 x context_parallel_degree x "
                          f"tensor_parallel_degree = {2 * dims.cp * dims.tp}")
    if dims.cp > 1 and config.ray.use_gpu and config.training.mixed_precision_param == "float32":
        raise ConfigError("context parallel on CUDA runs flash attention, which needs bfloat16: set "
                          "training.mixed_precision_param = auto or bfloat16")
    if dims.tp > 1 and seq % dims.tp:
        raise ConfigError(f"training.seq_len {seq} is not divisible by tensor_parallel_degree {dims.tp} "
                          "(sequence parallel splits it)")
    if p.enable_async_tensor_parallel and not (
            dims.tp > 1 and config.ray.use_gpu and config.compile.enable and "model" in config.compile.components):
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA and torch.compile of the model "
                          "(ray.use_gpu, compile.enable with 'model') and tensor_parallel_degree > 1")
    if dims.pp > 1:
        try:
            stages = num_stages(p, args.n_layers, dims.pp)
            stage_layers(args.n_layers, stages, p.pipeline_parallel_first_stage_less_layers,
                         p.pipeline_parallel_last_stage_less_layers)
            microbatches(local_batch, p.pipeline_parallel_microbatch_size)
            if config.validation.enable:
                microbatches(config.validation.local_batch_size, p.pipeline_parallel_microbatch_size)
        except PipelineError as e:
            raise ConfigError(str(e)) from None


def num_experts(args: Any) -> int | None:
    """The routed experts per MoE layer of a model shape (its args' ``num_experts``); None for a
    dense model."""
    return getattr(args, "num_experts", None)


def check_expert_parallel(config: JobConfig, dims: ParallelDims, args: Any) -> None:
    """What expert parallel needs beyond the mesh (``ParallelDims`` checks that it divides the
    shard degree left by tensor, pipeline and context parallel, and that context parallel is off):
    an MoE model whose experts it divides, and no per-op activation checkpointing. Tensor and
    pipeline parallel, compile and Float8 compose with it (docs/parallelism.md)."""
    key = f"parallelism.expert_parallel_degree = {dims.ep}"
    n = num_experts(args)
    if not n:
        raise ConfigError(f"{key} needs a Mixture-of-Experts model; model.name = {config.model.name!r} "
                          f"({config.model.flavor}) has no experts: set parallelism.expert_parallel_degree = 1")
    if n % dims.ep:
        raise ConfigError(f"{key} does not divide the {n} experts of {config.model.name} {config.model.flavor}: "
                          f"pick a divisor of {n} (that also divides the data-parallel shard degree {dims.dp_shard})")
    ac = config.activation_checkpoint
    if ac.mode == "selective" and str(ac.selective_ac_option) == "op":
        raise ConfigError(f"{key} does not combine with per-op activation checkpointing yet (activation_checkpoint.mode "
                          "= 'selective' with selective_ac_option = 'op': the recomputed all-to-all does not replay): "
                          "set activation_checkpoint.mode = 'full', or selective_ac_option to a number N (every Nth "
                          "block fully), or parallelism.expert_parallel_degree = 1")


def check_aux_loss(config: JobConfig, dims: ParallelDims, args: Any) -> None:
    """``training.load_balance_loss_weight`` (the MoE sequence-wise auxiliary loss) before launch,
    as the trainer checks it at build (``raytitan.trainer.build.with_aux_loss``): a per-sequence
    statistic of the routing, so not on a dense model, nor where ranks hold shards of a sequence
    (tensor, context parallel) or the schedule owns the backward (pipeline parallel)."""
    weight = config.training.load_balance_loss_weight
    if not weight:
        return
    key = f"training.load_balance_loss_weight = {weight}"
    if not hasattr(args, "aux_loss_alpha"):
        raise ConfigError(f"{key} needs a Mixture-of-Experts model; model.name = {config.model.name!r} has no "
                          "auxiliary loss: set it to 0")
    for degree, name in ((dims.tp, "tensor"), (dims.cp, "context"), (dims.pp, "pipeline")):
        if degree > 1:
            raise ConfigError(f"{key} does not combine with {name} parallel yet: set it to 0 (balancing by the "
                              f"routing bias alone) or parallelism.{name}_parallel_degree = 1")


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def data_parallel_degree(config: JobConfig, world_size: int) -> int:
    """dp when data parallel fills ``world_size`` (replicate x shard)."""
    p = config.parallelism
    block = p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree
    return world_size // block


def elastic_layout(config: JobConfig, world_size: int, global_batch: int) -> tuple[ParallelDims, int]:
    """For an elastic world: the largest data-parallel degree that fits and divides the global
    batch, and the local batch for it. Ranks beyond the layout idle until the next resize.

    Expert parallel is re-planned like data parallel: the largest degree up to the configured
    one that divides both the shard degree chosen and the number of experts (said in a log line
    when it differs from the configured degree)."""
    p = config.parallelism
    block = p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree * \
        p.pipeline_parallel_degree
    if world_size < block:
        raise ConfigError(
            f"{world_size} workers cannot form one block of replicate x cp x tp x pp = {block} ranks; "
            f"the run needs at least {block} (raise ray.min_workers to {block} or more)"
        )
    shard = max(d for d in range(1, world_size // block + 1)
                if global_batch % (p.data_parallel_replicate_degree * d) == 0)
    ep = elastic_expert_parallel(config, shard)
    try:
        dims = ParallelDims(p.data_parallel_replicate_degree, shard, p.context_parallel_degree,
                            p.tensor_parallel_degree, p.pipeline_parallel_degree, block * shard, ep=ep)
    except ParallelismError as e:
        raise ConfigError(str(e)) from None
    return dims, _largest_divisor_at_most(global_batch // dims.dp, config.training.local_batch_size)


def elastic_expert_parallel(config: JobConfig, shard: int) -> int:
    """The expert-parallel degree for a data-parallel shard degree an elastic world allows: the
    configured one if it still divides the shard degree, else the largest divisor of both the
    shard degree and the number of experts below it (1 at worst: every rank all experts)."""
    wanted = config.parallelism.expert_parallel_degree
    if wanted == 1:
        return 1
    try:
        n = num_experts(model_spec(config).flavor(config.model.flavor))
    except ModelSpecError:
        n = None
    if not n:
        return wanted  # a dense model: check_layout refuses the degree
    ep = max(d for d in range(1, wanted + 1) if shard % d == 0 and n % d == 0)
    if ep != wanted:
        logger.info("elastic layout: parallelism.expert_parallel_degree %d does not fit %d data-parallel shard ranks "
                    "(and %d experts); training with expert parallel %d (each expert's weights FSDP-sharded over %d of "
                    "them)", wanted, shard, n, ep, shard // ep)
    return ep


def check_fault_rank(config: JobConfig, world_size: int) -> None:
    """fault.kill_rank names a rank the run can have: below the largest world (an elastic run's
    ray.max_workers; else this world), or the injected fault would silently never fire."""
    fault = config.fault
    most = max(world_size, config.ray.worker_range[1]) if config.ray.elastic else world_size
    if fault.kill_step > 0 and fault.seed < 0 and fault.kill_rank >= most:
        raise ConfigError(f"fault.kill_rank = {fault.kill_rank} cannot exist: the run has at most {most} ranks "
                          f"(0 to {most - 1}); pick a rank in that range")


_ENOUGH_DATA: set[tuple] = set()


def check_enough_data_once(shards: list[str], tokenizer, seq_len: int, batch: int, key: str) -> None:
    """``check_enough_data`` once per process for a dataset and batch: an elastic run plans again
    at every resize, and remote shards should not be opened again each time."""
    seen = (tuple(shards), seq_len, batch, key)
    if seen not in _ENOUGH_DATA:
        check_enough_data(shards, tokenizer, seq_len, batch, key=key)
        _ENOUGH_DATA.add(seen)


def plan_run(config: JobConfig, world_size: int, resolve_data: bool = True) -> RunPlan:
    """Everything derived from the config for a world of ``world_size`` ranks.

    Fixed-size runs must match the degrees exactly. Elastic runs (``ray.min_workers``) keep the
    global batch and let data parallel absorb the world size: local batch x accumulation is
    re-derived, and ranks that fit no full layout idle. ``resolve_data=False`` skips listing and
    checking the shards (workers fed by the Ray data feeder never read them); with it, the
    process that plans the run also logs what it derived for the user (the tokenizer 'auto'
    chose, a vocabulary other than the flavor's), once per plan.
    """
    check_values(config)
    check_fault_rank(config, world_size)
    if config.ray.elastic:
        lo, hi = config.ray.worker_range
        if not lo <= hi:
            raise ConfigError(f"ray.min_workers ({lo}) must not exceed ray.max_workers ({hi})")
        if config.parallelism.data_parallel_shard_degree != -1:
            raise ConfigError("elastic runs (ray.min_workers set) need parallelism.data_parallel_shard_degree = -1")
        if config.training.global_batch_size <= 0:
            raise ConfigError("elastic runs need an explicit training.global_batch_size: it must not change on resize")
        global_batch = config.training.global_batch_size
        dims, local = elastic_layout(config, world_size, global_batch)
    else:
        try:
            dims = ParallelDims.from_config(config.parallelism, world_size)
        except ParallelismError as e:
            raise ConfigError(str(e)) from None
        local = config.training.local_batch_size
        global_batch = config.training.global_batch_size
        if global_batch == -1:
            global_batch = local * dims.dp
    try:
        tokenizer = build_tokenizer(config.model)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    spec = model_spec(config)
    hf_config = read_hf_config(config.checkpoint.initial_load_path) if config.checkpoint.initial_load_in_hf else None
    args, notes = model_shape(config, spec, tokenizer, hf_config)
    if resolve_data:  # the process that plans the run (the driver; each rank under torchrun), not every worker
        for level, message in notes:
            logger.log(level, message)
    if hf_config is not None:
        try:
            spec.hf.check_matches(args, hf_config)
        except HFFormatError as e:
            raise ConfigError(f"checkpoint.initial_load_path: {e}") from None

    check_layout(config, dims, args, local)

    if global_batch <= 0:
        raise ConfigError("training.global_batch_size must be > 0, or -1 for local_batch_size x dp")
    if global_batch % (local * dims.dp):
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not divisible by local_batch_size {local} x "
            f"data-parallel degree {dims.dp} = {local * dims.dp}; change one of them (or ray.num_workers)"
        )

    shards, validation_shards = [], []
    try:
        if resolve_data:
            shards = resolve_shards(config.training.dataset, config.training.dataset_path, config.training.seed)
            check_enough_data_once(shards, tokenizer, config.training.seq_len, global_batch, "training")
            if config.validation.enable:
                validation_shards = resolve_shards(config.validation.dataset, config.validation.dataset_path,
                                                   VALIDATION_SEED_OFFSET + config.training.seed, key="validation")
                check_enough_data_once(validation_shards, tokenizer, config.training.seq_len,
                                       config.validation.local_batch_size * dims.dp, "validation")
    except DataSourceError as e:
        raise ConfigError(str(e)) from None
    for key in ("training", "validation"):
        data = section(config, key)
        read = key == "training" or config.validation.enable
        if resolve_data and read and data.dataset == "c4_test" and not data.dataset_path:
            logger.info("%s.dataset = 'c4_test': %d generated English-like documents in C4's format (synthetic text, "
                        "not a sample of C4 like torchtitan's c4_test); set %s.dataset_path to read C4-format files "
                        "instead", key, C4_TEST_DOCS, key)
    return RunPlan(dims, world_size, args, global_batch, local, global_batch // (local * dims.dp), shards,
                   validation_shards)
