"""Check a config against the world it will run on, once, before any worker starts.

``plan_run`` turns a config plus a world size into every derived value the workers need
(degrees, batch split, model shape, shard list), or raises ``ConfigError`` naming the key.
Workers call it again on their side: the derivation lives in one place.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from raytitan.config import ConfigError, JobConfig
from raytitan.data.sources import DATASETS, DataSourceError, resolve_shards
from raytitan.data.tokenizer import build_tokenizer
from raytitan.models.llama3.args import FLAVORS, ModelArgs
from raytitan.parallel.dims import ParallelDims, ParallelismError

CHOICES = {
    "model.name": ("llama3",),
    "model.tokenizer": ("byte", "hf"),
    "optimizer.name": ("AdamW", "Adam"),
    "optimizer.implementation": ("auto", "foreach", "fused", "for-loop"),
    "lr_scheduler.decay_type": ("linear", "sqrt", "cosine"),
    "training.mixed_precision_param": ("auto", "bfloat16", "float32"),
    "training.mixed_precision_reduce": ("float32", "bfloat16"),
    "training.dataset": DATASETS,
    "validation.dataset": DATASETS,
}
POSITIVE = ("training.local_batch_size", "validation.local_batch_size", "validation.freq", "validation.steps", "training.seq_len", "training.steps", "optimizer.lr",
            "checkpoint.interval", "metrics.log_freq", "ray.num_workers")
NON_NEGATIVE = ("training.shuffle_buffer", "training.max_norm", "training.seed", "optimizer.weight_decay", "optimizer.eps",
                "lr_scheduler.warmup_steps", "lr_scheduler.min_lr_factor", "checkpoint.keep_latest_k",
                "ray.max_failures", "metrics.peak_tflops")


# Synthetic validation shards use their own seed, so they are never the training shards.
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class RunPlan:
    dims: ParallelDims
    model_args: ModelArgs
    global_batch_size: int
    local_batch_size: int
    accumulation_steps: int
    shards: list[str]
    validation_shards: list[str]


def _get(config: JobConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def check_values(config: JobConfig) -> None:
    """World-independent checks: choices, signs, ranges, files."""
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices and value.lower() not in [c.lower() for c in choices]:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")
    if config.model.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor = {config.model.flavor!r} is not one of {', '.join(FLAVORS)}")
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
    path = config.checkpoint.initial_load_path
    if path and not os.path.isfile(os.path.join(path, "COMMITTED")):
        raise ConfigError(f"checkpoint.initial_load_path: '{path}' is not a committed checkpoint step folder")
    if config.model.hf_assets_path and not os.path.isdir(config.model.hf_assets_path):
        raise ConfigError(f"model.hf_assets_path: no such folder '{config.model.hf_assets_path}'")


def plan_run(config: JobConfig, world_size: int) -> RunPlan:
    check_values(config)
    try:
        dims = ParallelDims.from_config(config.parallelism, world_size)
    except ParallelismError as e:
        raise ConfigError(str(e)) from None
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        raise ConfigError(
            "tensor, pipeline and context parallel degrees > 1 are not supported yet; "
            "set them to 1 (data parallel fills the world)"
        )

    try:
        tokenizer = build_tokenizer(config.model)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    args = FLAVORS[config.model.flavor].with_vocab(tokenizer.vocab_size)
    args = dataclasses.replace(args, max_seq_len=config.training.seq_len)
    if args.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.flavor {config.model.flavor} has vocab {args.vocab_size}, smaller than the tokenizer's "
            f"{tokenizer.vocab_size}: pick a tokenizer that fits or a flavor sized to it"
        )
    if args.n_heads % args.kv_heads:
        raise ConfigError(f"model: n_heads {args.n_heads} is not divisible by n_kv_heads {args.kv_heads}")
    if args.dim % args.n_heads or args.head_dim % 2:
        raise ConfigError(f"model: dim {args.dim} must split into an even head_dim over {args.n_heads} heads")

    local = config.training.local_batch_size
    global_batch = config.training.global_batch_size
    if global_batch == -1:
        global_batch = local * dims.dp
    if global_batch <= 0:
        raise ConfigError("training.global_batch_size must be > 0, or -1 for local_batch_size x dp")
    if global_batch % (local * dims.dp):
        raise ConfigError(
            f"training.global_batch_size {global_batch} is not divisible by local_batch_size {local} x "
            f"data-parallel degree {dims.dp} = {local * dims.dp}; change one of them (or ray.num_workers)"
        )

    try:
        shards = resolve_shards(config.training.dataset, config.training.dataset_path, config.training.seed)
        validation_shards = []
        if config.validation.enable:
            validation_shards = resolve_shards(config.validation.dataset, config.validation.dataset_path,
                                               VALIDATION_SEED_OFFSET + config.training.seed, key="validation")
    except DataSourceError as e:
        raise ConfigError(str(e)) from None
    return RunPlan(dims, args, global_batch, local, global_batch // (local * dims.dp), shards, validation_shards)
