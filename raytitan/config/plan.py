"""Check a config against the world it will run on, once, before any worker starts.

``plan_run`` turns a config plus a world size into every derived value the workers need
(degrees, batch split, model shape, shard list), or raises ``ConfigError`` naming the key.
Workers call it again on their side: the derivation lives in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from raytitan.components import storage
from raytitan.components.checkpoint.manager import ASYNC_MODES, LOADABLE
from raytitan.components.checkpoint.layout import CheckpointError, read_metadata
from raytitan.components.checkpoint.torchtitan import check_family, step_kind, weight_names
from raytitan.config.job import Checkpoint, ConfigError, JobConfig, section
from raytitan.components.data.sources import C4_TEST_DOCS, DATASETS, DataSourceError, resolve_shards
from raytitan.components.data.tokenizer import TOKENIZERS, build_tokenizer, has_tokenizer_file
from raytitan.components.metrics import PROGRESS_BAR_MODES
from raytitan.components.optimizer import DECAY_TYPES, IMPLEMENTATIONS, OPTIMIZERS
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
POSITIVE = ("profiling.profile_freq", "ray.resize_check_interval_s", "training.local_batch_size", "validation.local_batch_size", "validation.freq", "validation.steps", "training.seq_len", "training.steps", "optimizer.lr",
            "checkpoint.interval", "checkpoint.save_on_signal_timeout_s", "metrics.log_freq", "ray.num_workers")
NON_NEGATIVE = ("training.shuffle_buffer", "training.max_norm", "training.seed", "optimizer.weight_decay", "optimizer.eps",
                "lr_scheduler.warmup_steps", "lr_scheduler.min_lr_factor", "checkpoint.keep_latest_k",
                "ray.max_failures", "metrics.peak_tflops")


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
    for key in POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(config, key)}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
    if not 0 <= config.lr_scheduler.min_lr_factor <= 1:
        raise ConfigError("lr_scheduler.min_lr_factor must be within [0, 1]")
    if config.lr_scheduler.decay_ratio is not None and not 0 <= config.lr_scheduler.decay_ratio <= 1:
        raise ConfigError("lr_scheduler.decay_ratio must be within [0, 1] (or unset)")
    if config.lr_scheduler.total_steps is not None and config.lr_scheduler.total_steps <= 0:
        raise ConfigError(f"lr_scheduler.total_steps must be > 0, got {config.lr_scheduler.total_steps} "
                          "(or unset for training.steps)")
    check_checkpoint(config.checkpoint, config.run_dir, config.model.name)
    check_speed_features(config)
    if config.model.hf_assets_path and not os.path.isdir(config.model.hf_assets_path):
        raise ConfigError(f"model.hf_assets_path: no such folder '{config.model.hf_assets_path}'")


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


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def data_parallel_degree(config: JobConfig, world_size: int) -> int:
    """dp when data parallel fills ``world_size`` (replicate x shard)."""
    p = config.parallelism
    block = p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree
    return world_size // block


def elastic_layout(config: JobConfig, world_size: int, global_batch: int) -> tuple[ParallelDims, int]:
    """For an elastic world: the largest data-parallel degree that fits and divides the global
    batch, and the local batch for it. Ranks beyond the layout idle until the next resize."""
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
    dims = ParallelDims(p.data_parallel_replicate_degree, shard, p.context_parallel_degree,
                        p.tensor_parallel_degree, p.pipeline_parallel_degree, block * shard)
    return dims, _largest_divisor_at_most(global_batch // dims.dp, config.training.local_batch_size)


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
            if config.validation.enable:
                validation_shards = resolve_shards(config.validation.dataset, config.validation.dataset_path,
                                                   VALIDATION_SEED_OFFSET + config.training.seed, key="validation")
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
