"""Run configuration: one dataclass per TOML section, TOML + ``--section.key`` overrides.

Each key is documented once, in its field's ``doc`` metadata; ``--help`` prints them all.
The vocabulary follows torchtitan so existing configs carry over; ``[ray]`` is new. torchtitan's
keys that raytitan has no field for are read from the table in ``raytitan.config.torchtitan``:
accepted and named in one warning, or an error when their value asks for something raytitan
does not do.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from raytitan.config.torchtitan import KEYS as TORCHTITAN_KEYS

logger = logging.getLogger("raytitan")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what to do."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes: ``low`` .. ``high`` (either end left out, or open), plus
    ``special`` values outside it that mean something (-1 = unset). NaN and infinity never pass:
    ``nan <= 0`` is False, so a plain sign check would let them through."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()

    def __contains__(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.low is None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return " or ".join([text, *(f"{v:g}" for v in self.special)])


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
COUNT = Range(1)  # a count or frequency of at least one
FILL = Range(1, special=(-1,))  # at least one, or -1 for the key's automatic value


def opt(default: Any, doc: str, allowed: Range | None = None) -> Any:
    """A config field with its one-line documentation and, for numbers, the values it takes
    (checked before launch by ``raytitan.config.plan``, shown in the generated reference)."""
    metadata = {"doc": doc, **({"allowed": allowed} if allowed is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Job:
    config_file: str | None = opt(None, "TOML file to read; command-line keys override it")
    dump_folder: str = opt("./outputs", "Root folder for run outputs when ray.storage_path is unset")
    description: str = opt("raytitan run", "Free text describing the run; the launcher's summary shows it")


@dataclass
class Model:
    name: str = opt("llama3", "Model family: a built-in one (llama3), or package.module:attribute naming a ModelSpec in your own code")
    flavor: str = opt("debugmodel", "Named shape of the family (llama3: debugmodel, tiny, 1B, 3B, 8B, 70B, 405B, 1B_untied, 3B_untied)")
    hf_assets_path: str | None = opt(None, "Folder with tokenizer.json (and tokenizer_config.json)")
    tokenizer: str = opt("auto", "Tokenizer: 'auto' ('hf' when hf_assets_path is set, else 'byte'), 'byte' (no files) "
                                 "or 'hf' (tokenizer.json in hf_assets_path); the model's vocabulary is the tokenizer's")
    converters: list = opt([], "Model conversions: quantize.linear.float8 (or float8) for Float8 training")
    attn_mask_type: str = opt("causal", "Attention over packed rows: causal (all earlier tokens of the row) or "
                                        "block_causal (earlier tokens of the same document only, RoPE positions "
                                        "restarting at each document's BOS; not with context parallel)")


@dataclass
class Training:
    local_batch_size: int = opt(4, "Sequences per microbatch on each data-parallel rank", COUNT)
    global_batch_size: int = opt(-1, "Sequences per optimizer step over all ranks; -1 = local x dp (no accumulation)", FILL)
    seq_len: int = opt(256, "Tokens per training sequence; at most the flavor's max_seq_len unless "
                            "allow_seq_len_above_model_max", COUNT)
    steps: int = opt(40, "Optimizer steps to train for", COUNT)
    max_norm: float = opt(1.0, "Gradient clipping max total norm; 0 disables clipping", NON_NEGATIVE)
    load_balance_loss_weight: float = opt(
        0.0, "MoE models: weight (DeepSeek-V3's alpha, e.g. 1e-4) of the sequence-wise auxiliary balance loss added "
        "to the training loss and logged as moe/aux_loss; 0 = off (balancing by the routing bias alone). Not with "
        "tensor, context or pipeline parallel", NON_NEGATIVE)
    dataset: str = opt("synthetic", "Dataset: synthetic (seeded C4-format shards), c4_test (2,000 generated C4-format "
                       "documents, torchtitan's name for its small test set), c4, c4_validation, or files")
    dataset_path: str | None = opt(None, "c4: a mirror's root, its en/ folder or any folder of c4-train shards (default the hub); "
                                         "files: folder, glob or URL of shards; "
                                         "c4_test: C4-format files to read instead of generating them")
    shuffle_buffer: int = opt(0, "Shuffle windows within seeded blocks of this many (0 = file order)", NON_NEGATIVE)
    seed: int = opt(0, "Seed for weights and data order", NON_NEGATIVE)
    deterministic: bool = opt(False, "Use deterministic algorithms (bitwise reproducible, slower)")
    mixed_precision_param: str = opt("auto", "FSDP param dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32")
    mixed_precision_reduce: str = opt("float32", "FSDP gradient reduce dtype")
    allow_seq_len_above_model_max: bool = opt(
        False, "Train at a seq_len above the flavor's max_seq_len (the context its RoPE settings are made for); "
        "without it that is a config error")
    on_nonfinite: str = opt(
        "stop", "A step whose loss or gradient norm is NaN or infinite: stop (raise naming the step, nothing "
        "applied or saved) or skip (drop its update, count it; the step, data and schedule still advance)")
    max_nonfinite_skips: int = opt(
        3, "on_nonfinite = skip: skip at most this many non-finite steps in a row; the next one stops the run "
        "with the error", COUNT)


@dataclass
class Validation:
    enable: bool = opt(False, "Evaluate on held-out data during training")
    dataset: str = opt("synthetic", "Validation dataset (same choices as training.dataset)")
    dataset_path: str | None = opt(None, "Validation dataset location (as training.dataset_path)")
    local_batch_size: int = opt(4, "Sequences per validation microbatch on each data-parallel rank", COUNT)
    freq: int = opt(20, "Evaluate every this many steps (and at the last step)", COUNT)
    steps: int = opt(4, "Batches per evaluation; the same batches every time, so losses compare", COUNT)


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "HSDP replicate groups (1 = plain FSDP)", COUNT)
    data_parallel_shard_degree: int = opt(-1, "FSDP shard degree; -1 fills the remaining ranks", FILL)
    tensor_parallel_degree: int = opt(1, "Tensor parallel degree", COUNT)
    pipeline_parallel_degree: int = opt(1, "Pipeline parallel degree", COUNT)
    context_parallel_degree: int = opt(1, "Context parallel degree: each rank holds 1/cp of every sequence", COUNT)
    expert_parallel_degree: int = opt(
        1, "Expert parallel degree (MoE models): experts split over this many ranks borrowed from the data-parallel "
        "shard ranks (it must divide data_parallel_shard_degree and the number of experts); tokens reach their "
        "experts by all-to-all; expert weights are FSDP-sharded over the remaining shard ranks", COUNT)
    fsdp_reshard_after_forward: str = opt(
        "default", "Free gathered FSDP params after forward: default (yes, except with pipeline parallel), always, never")
    disable_loss_parallel: bool = opt(False, "With tensor parallel, gather the logits instead of a vocab-sharded loss")
    enable_async_tensor_parallel: bool = opt(False, "Overlap TP collectives with matmuls (CUDA + compile only)")
    pipeline_parallel_schedule: str = opt(
        "1F1B", "Pipeline schedule: 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble or ZBVZeroBubble")
    pipeline_parallel_microbatch_size: int = opt(1, "Sequences per pipeline microbatch; divides training.local_batch_size", COUNT)
    pipeline_parallel_layers_per_stage: int | None = opt(
        None, "Layers per pipeline stage (counting the embedding and output as the *_less_layers below); unset = "
        "one stage per rank (two for interleaved schedules)", COUNT)
    pipeline_parallel_first_stage_less_layers: int = opt(1, "The first stage holds this many fewer blocks (for the embedding)", NON_NEGATIVE)
    pipeline_parallel_last_stage_less_layers: int = opt(1, "The last stage holds this many fewer blocks (for the output head)", NON_NEGATIVE)
    context_parallel_rotate_method: str = opt(
        "allgather", "How ring attention moves K/V between cp ranks: allgather (once, memory for the "
        "whole sequence's K/V) or alltoall (passed round the ring, memory for two ranks' K/V)")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "Recompute activations in backward to save memory: none, full (every block) or selective")
    selective_ac_option: str = opt(
        "op", "selective: 'op' (keep matmul and attention outputs, recompute the rest) or N (every Nth block fully; "
        "TOML may give it as an integer)")


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile the components below")
    components: list = opt(["model", "loss"], "What to compile: model (each transformer block), loss")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "Record torch.profiler traces on every rank")
    profile_freq: int = opt(10, "Trace the last step of every this many", COUNT)
    save_traces_folder: str = opt("profile_traces", "Trace folder inside the run folder")
    enable_memory_snapshot: bool = opt(False, "CUDA: record allocations; dump a snapshot every profile_freq steps")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "Memory snapshot folder inside the run folder")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer: AdamW or Adam")
    lr: float = opt(1e-3, "Peak learning rate", POSITIVE)
    beta1: float = opt(0.9, "Adam beta1", Range(0, 1, high_open=True))
    beta2: float = opt(0.95, "Adam beta2", Range(0, 1, high_open=True))
    eps: float = opt(1e-8, "Adam epsilon", POSITIVE)
    weight_decay: float = opt(0.1, "Decoupled weight decay", NON_NEGATIVE)
    implementation: str = opt("auto", "Kernel: auto (fused on CUDA, foreach on CPU), foreach, fused, for-loop")


@dataclass
class LRScheduler:
    warmup_steps: int = opt(5, "Linear warmup (torchtitan's): step n <= warmup_steps trains at n / warmup_steps x "
                               "optimizer.lr; cut to the total steps if longer", NON_NEGATIVE)
    total_steps: int | None = opt(None, "Steps the schedule spans; unset = training.steps. A run past it stays at "
                                        "the schedule's last value", COUNT)
    decay_ratio: float | None = opt(None, "Share of the total steps spent decaying at the end (warmup-stable-decay), "
                                          "cut to fit after the warmup; unset = every step after warmup", FRACTION)
    decay_type: str = opt("linear", "Decay shape: linear, sqrt or cosine")
    min_lr_factor: float = opt(0.0, "Learning rate at the end of decay, as a fraction of optimizer.lr", FRACTION)


@dataclass
class Checkpoint:
    enable: bool = opt(True, "Save and resume DCP checkpoints")
    folder: str = opt("checkpoint", "Checkpoint folder inside the run folder")
    interval: int = opt(20, "Save every this many steps (and always at the last step)", COUNT)
    load_step: int = opt(-1, "Resume from this step instead of the newest committed one (-1 = newest)", Range(0, special=(-1,)))
    keep_latest_k: int = opt(3, "Keep this many newest committed checkpoints (0 = keep all)", NON_NEGATIVE)
    create_seed_checkpoint: bool = opt(False, "Write initial weights as step-0 from one process, then exit")
    initial_load_path: str | None = opt(
        None, "Where a run without checkpoints starts from: a committed step folder, a .pt file of weights "
        "(convert to-torch), or a Hugging Face model folder with initial_load_in_hf")
    initial_load_model_only: bool = opt(True, "Take only the weights from initial_load_path (not optimizer, schedule, data position, step)")
    initial_load_in_hf: bool = opt(False, "initial_load_path is a Hugging Face model folder (config.json + safetensors)")
    exclude_from_loading: list = opt([], "States not restored on load: any of model, optimizer, lr_scheduler, dataloader, train_state")
    async_mode: str = opt("disabled", "disabled; async (write in a background thread while training goes on); "
                          "async_with_pinned_mem (also stage into pinned memory: CUDA)")
    last_save_model_only: bool = opt(False, "The last save of the run holds only the model weights")
    export_dtype: str = opt("float32", "Weight dtype of a model-only last save and of last_save_in_hf: float32, bfloat16, float16")
    last_save_in_hf: bool = opt(False, "Also export the last step as a Hugging Face model folder step-N-hf (safetensors + config.json)")
    memory_interval: int = opt(
        0, "Under Ray: also snapshot every rank's state into host memory every this many steps (0 = off), kept by a "
        "store on each node and replicated to other nodes; a restarted group resumes from the newest complete "
        "snapshot when it is newer than the newest disk checkpoint", NON_NEGATIVE)
    memory_replicas: int = opt(1, "Copies of each rank's memory snapshot on other nodes, besides the one on its own node", NON_NEGATIVE)
    memory_max_node_share: float = opt(
        0.5, "Refuse memory snapshots (before launch) whose two newest snapshots with their replicas would need more "
        "than this share of a node's memory", FRACTION)
    save_on_signal_timeout_s: float = opt(
        120.0, "On SIGTERM (or SIGINT to the Ray driver): seconds for the workers to finish the step in flight and the "
        "next, save and commit it, before the run is ended without it (exit code 1, not 75)", POSITIVE)


@dataclass
class Metrics:
    log_freq: int = opt(5, "Log metrics every this many steps", COUNT)
    enable_tensorboard: bool = opt(True, "Write TensorBoard scalars")
    save_tb_folder: str = opt("tb", "TensorBoard folder inside the run folder")
    peak_tflops: float = opt(0.0, "Peak TFLOP/s per device for MFU when the device is not in the table (0 = look up)", NON_NEGATIVE)
    progress_bar: str = opt("auto", "Progress bar on the driver: auto (when a terminal or notebook shows it), on, off")


@dataclass
class Ray:
    address: str | None = opt(None, "Ray cluster address; unset uses RAY_ADDRESS or starts a local instance")
    num_workers: int = opt(2, "Training workers (one process each)", COUNT)
    use_gpu: bool = opt(False, "One GPU per worker, NCCL backend")
    resources_per_worker: dict = opt({}, "Ray resources per worker, e.g. CPU=4,GPU=1, each amount finite and >= 0 "
                                         "(default: CPU share leaving room for data)")
    storage_path: str | None = opt(None, "Run storage every node sees: a shared folder or s3://, gs:// (pyarrow URI options after ?); "
                                      "default: job.dump_folder")
    name: str | None = opt(None, "Run name; the run folder is storage_path/name (default: <model.name>-<model.flavor>, with ':' as '.'); "
                                "one path component: letters, digits, '.', '_', '-'")
    max_failures: int = opt(0, "Worker-group restarts allowed before the run fails", NON_NEGATIVE)
    min_workers: int = opt(-1, "Elastic: keep training on as few as this many workers (-1 = fixed size)", FILL)
    max_workers: int = opt(-1, "Elastic: grow back up to this many workers (-1 = ray.num_workers)", FILL)
    resize_check_interval_s: float = opt(60.0, "Elastic: check for capacity to grow at checkpoint steps, at most this often (seconds)", POSITIVE)
    worker_group_start_timeout_s: float = opt(
        10.0, "Seconds Ray Train waits for a new worker group's resources before deciding its size again; short, so "
        "a group sized from a view that still counted a lost node is given up soon (sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)",
        POSITIVE)
    health_check_interval_s: float = opt(
        2.0, "Seconds between Ray Train's polls of the workers: a dead worker is noticed, and a finished group ends, "
        "within this; each poll is a call to every worker (sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)", POSITIVE)

    @property
    def elastic(self) -> bool:
        return self.min_workers > 0

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: equal unless elastic."""
        most = self.max_workers if self.max_workers > 0 else self.num_workers
        return (self.min_workers, most) if self.elastic else (self.num_workers, self.num_workers)


@dataclass
class Fault:
    kill_step: int = opt(-1, "Kill a worker (SIGKILL) at the start of this step, once per run (-1 = never)", FILL)
    kill_rank: int = opt(0, "Rank that kill_step kills; below the run's largest world size", NON_NEGATIVE)
    during_save: bool = opt(False, "Kill after the checkpoint of kill_step is written but before it commits")
    during_snapshot: bool = opt(False, "Kill after the memory snapshot of kill_step is written but before it commits")
    seed: int = opt(-1, "Pick kill_step and kill_rank at random from this seed (-1 = use the keys above)", Range(0, special=(-1,)))


@dataclass
class Float8:
    recipe_name: str = opt("tensorwise", "Float8 scaling: tensorwise (one scale per tensor), rowwise, rowwise_with_gw_hp")
    enable_fsdp_float8_all_gather: bool = opt(False, "FSDP all-gathers weights in float8 (tensorwise only)")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(
        False, "One all-reduce for every weight scale after the optimizer step (with the all-gather above)")
    filter_fqns: list = opt(["output"], "Linear layers whose name contains one of these stay in high precision")
    auto_filter_small_kn: bool = opt(False, "Also keep linears too small to gain from float8 (torchao's H100 thresholds)")
    emulate: bool = opt(False, "Emulate float8 matmuls in high precision (machines without float8 hardware, CPU)")


# TOML table path -> its section class; nested tables ([quantize.linear.float8]) are dotted paths.
SECTIONS: dict[str, type] = {
    "job": Job,
    "model": Model,
    "training": Training,
    "parallelism": Parallelism,
    "optimizer": Optimizer,
    "lr_scheduler": LRScheduler,
    "checkpoint": Checkpoint,
    "activation_checkpoint": ActivationCheckpoint,
    "compile": Compile,
    "quantize.linear.float8": Float8,
    "profiling": Profiling,
    "metrics": Metrics,
    "validation": Validation,
    "ray": Ray,
    "fault": Fault,
}


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    ray: Ray = field(default_factory=Ray)
    fault: Fault = field(default_factory=Fault)
    # torchtitan keys read without a raytitan field (raytitan/config/torchtitan.py) and their values, for the
    # one warning that names them; not part of the config itself (not saved, not compared).
    torchtitan_ignored: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def run_name(self) -> str:
        # A spec in the user's code (package.module:attribute) names its folder with dots only.
        return self.ray.name or f"{self.model.name.replace(':', '.')}-{self.model.flavor}"

    @property
    def run_dir(self) -> str:
        """Folder (or object-store URI, without its options) holding this run's checkpoints,
        metrics, restart history and resolved config."""
        root = self.ray.storage_path or self.job.dump_folder
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        return f"{root.split('?', 1)[0].rstrip('/')}/{self.run_name}"

    @property
    def local_dir(self) -> str:
        """Where files that need a real filesystem go (TensorBoard, profiler traces): the run
        folder itself unless that is in an object store, then job.dump_folder/<run name>."""
        if "://" not in self.run_dir:
            return self.run_dir
        return os.path.join(os.path.abspath(os.path.expanduser(self.job.dump_folder)), self.run_name)

    def with_absolute_paths(self) -> JobConfig:
        """A copy whose local paths no longer depend on the current directory (workers run elsewhere)."""
        resolved = JobConfig.from_dict(self.to_dict())

        def absolute(path: str | None) -> str | None:
            if path is None or "://" in path:
                return path
            return os.path.abspath(os.path.expanduser(path))

        resolved.job.dump_folder = absolute(resolved.job.dump_folder)
        resolved.ray.storage_path = absolute(resolved.ray.storage_path)
        resolved.training.dataset_path = absolute(resolved.training.dataset_path)
        resolved.validation.dataset_path = absolute(resolved.validation.dataset_path)
        resolved.model.hf_assets_path = absolute(resolved.model.hf_assets_path)
        resolved.checkpoint.initial_load_path = absolute(resolved.checkpoint.initial_load_path)
        return resolved

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections by their TOML path (what ``from_dict`` and ``to_toml`` take)."""
        return {path: dataclasses.asdict(section(self, path)) for path in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> JobConfig:
        config = cls()
        apply_dict(config, data, source="dict")
        return config


# --------------------------------------------------------------------------- parsing


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; other types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


# String keys that torchtitan configs also write as TOML integers; stored as the string ("2"),
# the same value the command line gives.
INTEGER_STRINGS = ("activation_checkpoint.selective_ac_option",)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise naming the key."""
    base = _base_type(tp)
    # An optional key (``T | None``, strings included) is unset by None or "None" (any case): TOML
    # has no null, so the command line and dicts write it so. A plain str key keeps "none" as a
    # value (e.g. activation_checkpoint.mode = "none").
    if base is not tp and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if key in INTEGER_STRINGS and isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise ValueError
            return value
        if typing.get_origin(base) is list or base is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [i.strip() if isinstance(i, str) else i for i in items if i != ""]
        if base is dict:
            if isinstance(value, dict):
                return dict(value)
            out = {}
            for item in filter(None, (s.strip() for s in str(value).split(","))):
                name, _, amount = item.partition("=")
                out[name.strip()] = float(amount)
            return out
    except (TypeError, ValueError):
        pass
    type_name = "str or int" if key in INTEGER_STRINGS else getattr(base, "__name__", str(base))
    raise ConfigError(f"{key}: expected {type_name}, got {value!r}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() + list(SECTIONS) + list(TORCHTITAN_KEYS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the valid keys"
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def key_type(key: str) -> Any:
    """The type of a raytitan key or of a torchtitan key raytitan reads; None for neither."""
    path, _, name = key.rpartition(".")
    if path in SECTIONS and name in _field_types(SECTIONS[path]):
        return _field_types(SECTIONS[path])[name]
    spec = TORCHTITAN_KEYS.get(key)
    return spec.type if spec else None


def _is_table(path: str) -> bool:
    """A TOML table path: a section, or a table on the way to one or to a torchtitan key."""
    return any(s == path or s.startswith(path + ".") for s in SECTIONS) or \
        any(k.startswith(path + ".") for k in TORCHTITAN_KEYS)


ATTRIBUTES = {"quantize.linear.float8": "float8"}  # sections whose JobConfig attribute differs from the path


def section(config: JobConfig, path: str) -> Any:
    return getattr(config, ATTRIBUTES.get(path, path))


def set_key(config: JobConfig, key: str, value: Any, source: str) -> None:
    """Set a raytitan key, or read a torchtitan one (raytitan/config/torchtitan.py): its alias is
    set, an accepted value is recorded for ``check_torchtitan_keys``, any other value is an error."""
    path, _, name = key.rpartition(".")
    if path in SECTIONS and name in _field_types(SECTIONS[path]):
        setattr(section(config, path), name, _convert(value, _field_types(SECTIONS[path])[name], key))
        return
    spec = TORCHTITAN_KEYS.get(key)
    if spec is None:
        raise _unknown(key, source)
    value = _convert(value, spec.type, key)
    if spec.alias:
        set_key(config, spec.alias, value, source)
        return
    if spec.accepts and value not in spec.accepts:
        accepted = " or ".join("unset" if v is None else toml_value(v) for v in spec.accepts)
        raise ConfigError(f"{key} = {toml_value(value)} in {source}: raytitan reads this torchtitan key only as "
                          f"{accepted}: {spec.effect}")
    config.torchtitan_ignored[key] = value


def check_torchtitan_keys(config: JobConfig) -> None:
    """Once every key is read: torchtitan keys that must equal a raytitan key do; one warning
    names every torchtitan key raytitan accepted without acting on it."""
    for key, value in config.torchtitan_ignored.items():
        spec = TORCHTITAN_KEYS[key]
        if spec.same_as:
            path, _, name = spec.same_as.rpartition(".")
            expected = getattr(section(config, path), name)
            if value != expected:
                raise ConfigError(f"{key} = {toml_value(value)} differs from {spec.same_as} = {toml_value(expected)}: "
                                  f"{spec.effect}")
    if config.torchtitan_ignored:
        logger.warning("torchtitan keys accepted with no effect in raytitan: %s (docs/from_torchtitan.md says what "
                       "raytitan does instead)", ", ".join(config.torchtitan_ignored))


def apply_dict(config: JobConfig, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set keys from (nested) TOML tables; a table path is a section or leads to one."""
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        if _is_table(path):
            if not isinstance(value, dict):
                raise ConfigError(f"[{path}] in {source} must be a table of keys")
            apply_dict(config, value, source, path)
        else:
            set_key(config, path, value, source)


def load_toml(path: str) -> dict[str, Any]:
    """A TOML config file as a dict; any file that is not one (missing, unreadable, binary, not UTF-8) is a
    ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"job.config_file: no such file '{path}'")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"job.config_file: cannot read '{path}': {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"job.config_file: '{path}' is not a TOML file: byte {e.start} is not UTF-8 text "
                          "(TOML files are UTF-8; is this a binary or another file?)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job.config_file: '{path}' is not valid TOML: {e}") from None


CLI_FORMS = ("Booleans: --section.key, --section.key true|false, and for false --no-section.key or torchtitan's "
             "--section.no-key; dashes and underscores are the same in key names (--lr-scheduler.warmup-steps); "
             "lists: comma-separated; dicts: K=V,K=V; None unsets a key whose default is None.")


def _help_text() -> str:
    lines = ["Config keys (TOML [section] key, or --section.key VALUE on the command line):", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = f", takes {f.metadata['allowed']}" if "allowed" in f.metadata else ""
            lines.append(f"  --{section}.{f.name:<34} {f.metadata['doc']} (default: {default!r}{allowed})")
        lines.append("")
    lines.append("torchtitan keys raytitan has no field for (read, then ignored or an error; docs/from_torchtitan.md):")
    for key, spec in TORCHTITAN_KEYS.items():
        accepted = "any value" if not spec.accepts else "only " + " or ".join(
            "unset" if v is None else toml_value(v) for v in spec.accepts)
        what = f"= {spec.alias}" if spec.alias else f"{accepted}; {spec.effect}"
        lines.append(f"  --{key:<36} {what}")
    lines += ["", CLI_FORMS]
    return "\n".join(lines)


def _flag_key(written: str) -> tuple[str, bool]:
    """A command-line key as written -> (key, negated). Dashes mean underscores
    (``lr-scheduler.warmup-steps``); ``no-section.key`` and torchtitan's ``section.no-key`` negate."""
    key = written.replace("-", "_")
    if key_type(key) is not None:
        return key, False
    path, _, name = key.rpartition(".")
    for plain in (key[3:] if key.startswith("no_") else None, f"{path}.{name[3:]}" if name.startswith("no_") else None):
        if plain and key_type(plain) is not None:
            return plain, True
    return key, False


def parse_args(argv: list[str] | None = None, prog: str = "raytitan.train") -> JobConfig:
    """Defaults < TOML file < command-line keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"usage: python -m {prog} [--job.config_file FILE] [--section.key VALUE ...]\n")
        print(_help_text())
        raise SystemExit(0)

    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': keys are given as --section.key VALUE")
        written, eq, value = arg[2:].partition("=")
        key, negated = _flag_key(written)
        tp = key_type(key)
        if tp is None:
            raise _unknown(key, "the command line")
        is_bool = _base_type(tp) is bool
        if negated:
            if not is_bool or eq:
                raise ConfigError(f"--{written}: only boolean keys can be negated")
            value = False
        elif not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if is_bool and (nxt is None or nxt.startswith("--")):
                value = True
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        overrides.append((key, value))
        i += 1

    config = JobConfig()
    config_file = next((v for k, v in overrides if k == "job.config_file"), None)
    if config_file:
        apply_dict(config, load_toml(config_file), source=config_file)
    for key, value in overrides:
        set_key(config, key, value, source="the command line")
    check_torchtitan_keys(config)
    return config


def toml_value(v: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def to_toml(config: JobConfig) -> str:
    """The resolved config as TOML, loadable again with --job.config_file."""
    out = []
    for section, values in config.to_dict().items():
        out.append(f"[{section}]")
        out += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)
