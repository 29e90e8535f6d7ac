"""torchtitan's config keys that raytitan reads without a key of its own (data only).

raytitan's sections use torchtitan's (v0.2.x, the TOML era) names, so most keys are shared and
mean the same. The rest of torchtitan's keys are listed here, so that a torchtitan TOML or
command line loads unchanged rather than failing on a key it has every right to set:

- ``accepts=()``: the key changes nothing raytitan computes (printing, colours, Weights &
  Biases, dataloader workers, garbage-collection timing, settings of features for MoE models):
  any value is accepted, and the one warning after reading a config names it;
- ``accepts=(v, ...)``: the key has a real meaning that raytitan does not implement; the listed
  values are the ones that mean what raytitan does anyway (torchtitan's default: off), and any
  other value is a ``ConfigError`` saying what to do instead: a run must not quietly train
  something other than what was asked;
- ``same_as``: accepted when equal to a raytitan key's value (``validation.seq_len``), else an error;
- ``alias``: the same setting under another raytitan name (``debug.seed`` -> ``training.seed``).

A key torchtitan never had is still an unknown key. ``raytitan.config.job`` does the reading;
docs/configuration.md lists this table (generated) and docs/from_torchtitan.md explains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TorchtitanKey:
    type: Any  # torchtitan's type: how a command-line value is read
    effect: str  # what raytitan does instead, in words
    accepts: tuple = ()  # () = any value; else the only values accepted
    alias: str | None = None  # a raytitan key with the same meaning
    same_as: str | None = None  # a raytitan key whose value this one must equal (checked once all keys are read)

    @property
    def ignored(self) -> bool:
        return self.alias is None


def _same(effect: str, *keys: str, type: Any = bool, accepts: tuple = ()) -> dict[str, TorchtitanKey]:
    return {key: TorchtitanKey(type, effect, accepts) for key in keys}


_LOADER = "raytitan's data pipeline (Ray Data actors, or the rank itself under torchrun) replaces torch DataLoader workers"


def _loader(section: str) -> dict[str, TorchtitanKey]:
    """torchtitan's [training.dataloader] / [validation.dataloader] tables."""
    return {f"{section}.dataloader.num_workers": TorchtitanKey(int, _LOADER),
            f"{section}.dataloader.persistent_workers": TorchtitanKey(bool, _LOADER),
            f"{section}.dataloader.pin_memory": TorchtitanKey(bool, _LOADER),
            f"{section}.dataloader.prefetch_factor": TorchtitanKey(int | None, _LOADER)}

_MOE = "an MoE setting raytitan's MoE layer (raytitan/models/moe.py) does not have"
_MEMORY_BUDGET = "only for activation_checkpoint.mode = memory_budget, which raytitan does not have"
_FLIGHT_RECORDER = "no NCCL flight recorder"

KEYS: dict[str, TorchtitanKey] = {
    "job.print_config": TorchtitanKey(bool, "the launcher always prints the resolved config"),
    "job.save_config_file": TorchtitanKey(str | None, "the run folder always holds the resolved config.toml"),
    "job.custom_config_module": TorchtitanKey(
        str, "the config cannot be extended from a module; your own model is model.name = package.module:attribute",
        accepts=("",)),
    **_same("traces record one step (the last of every profile_freq) after one warm-up step",
            "profiling.profiler_active", "profiling.profiler_warmup", type=int),
    "metrics.disable_color_printing": TorchtitanKey(bool, "log lines have no colours"),
    "metrics.save_for_all_ranks": TorchtitanKey(
        bool, "rank 0 writes the metrics; its loss is already reduced over all ranks and pipeline stages"),
    "metrics.enable_wandb": TorchtitanKey(
        bool, "no Weights & Biases logging: metrics go to metrics.jsonl and TensorBoard (metrics.enable_tensorboard)"),
    "model.tokenizer_path": TorchtitanKey(
        str | None, "deprecated in torchtitan too: set model.hf_assets_path to the folder holding tokenizer.json",
        accepts=(None,)),
    "model.print_after_conversion": TorchtitanKey(bool, "the model is not printed"),
    "optimizer.early_step_in_backward": TorchtitanKey(
        bool, "the optimizer steps after the whole backward pass (gradient clipping needs all gradients); "
        "remove the key", accepts=(False,)),
    "training.enable_cpu_offload": TorchtitanKey(
        bool, "FSDP CPU offload is not implemented; use more ranks or activation checkpointing", accepts=(False,)),
    "training.dtype": TorchtitanKey(
        str, "parameters and optimizer state stay float32; for bfloat16 compute set "
        "training.mixed_precision_param = bfloat16", accepts=("float32",)),
    **_same("Python's garbage collector runs on its own schedule", "training.gc_freq", type=int),
    **_same("Python's garbage collector runs on its own schedule", "training.gc_debug"),
    **_loader("training"),
    "parallelism.module_fqns_per_model_part": TorchtitanKey(
        list, "stages are split by pipeline_parallel_layers_per_stage and the first/last_stage_less_layers keys",
        accepts=(None,)),
    "parallelism.pipeline_parallel_schedule_csv": TorchtitanKey(
        str | None, "schedules are not read from CSV files: pick parallelism.pipeline_parallel_schedule",
        accepts=("", None)),
    "parallelism.pipeline_parallel_expert_parallel_overlap": TorchtitanKey(bool, _MOE),
    "parallelism.context_parallel_load_balancer": TorchtitanKey(
        str | None, "context parallel always uses the head-tail layout (torchtitan's headtail)",
        accepts=("headtail",)),
    "parallelism.expert_tensor_parallel_degree": TorchtitanKey(
        int, "no expert tensor parallel: experts are split whole over parallelism.expert_parallel_degree ranks",
        accepts=(1,)),
    "parallelism.expert_parallel_comm_backend": TorchtitanKey(
        str, "tokens reach their experts by torch.distributed all-to-all (torchtitan's 'standard'); no DeepEP",
        accepts=("standard",)),
    "checkpoint.enable_ft_dataloader_checkpoints": TorchtitanKey(
        bool, "for torchft only; raytitan's checkpoints always hold the data position"),
    "checkpoint.initial_load_in_hf_quantized": TorchtitanKey(
        bool, "quantized Hugging Face checkpoints are not read", accepts=(False,)),
    "checkpoint.enable_first_step_checkpoint": TorchtitanKey(
        bool, "no save after the first step; to try saving early set checkpoint.interval = 1", accepts=(False,)),
    "checkpoint.load_only": TorchtitanKey(
        bool, "no load-only mode: a run with checkpoint.enable saves at checkpoint.interval", accepts=(False,)),
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": TorchtitanKey(
        list, "for MoE routers (torchtitan's default names moe.router.gate, absent from the dense models)",
        accepts=(["moe.router.gate"], [])),
    "activation_checkpoint.early_stop": TorchtitanKey(bool, "recomputation runs to the end of each block (same values)"),
    **_same(_MEMORY_BUDGET, "activation_checkpoint.memory_budget", type=float),
    **_same(_MEMORY_BUDGET, "activation_checkpoint.visualize_memory_budget_pareto"),
    "activation_checkpoint.preserve_rng_state": TorchtitanKey(
        bool, "the models draw no random numbers in forward, so there is no RNG state to preserve"),
    "activation_checkpoint.determinism_check": TorchtitanKey(str, "torch's default recomputation check"),
    "activation_checkpoint.debug": TorchtitanKey(bool, "no activation-checkpoint debug capture"),
    "compile.backend": TorchtitanKey(str, "torch.compile always uses inductor", accepts=("inductor",)),
    **_same("no MX formats (model.converters has no mx converter)", "quantize.linear.mx.mxfp8_dim1_cast_kernel_choice",
            "quantize.linear.mx.recipe_name", type=str),
    **_same("no MX formats (model.converters has no mx converter)", "quantize.linear.mx.filter_fqns", type=list),
    **_same(_MOE, "quantize.grouped_mm.float8.fqns", "quantize.grouped_mm.mx.fqns", type=list),
    "quantize.grouped_mm.mx.recipe_name": TorchtitanKey(str, _MOE),
    **_same("the process group keeps the timeout Ray Train or torchrun gives it",
            "comm.init_timeout_seconds", "comm.train_timeout_seconds", type=int),
    "comm.trace_buf_size": TorchtitanKey(int, _FLIGHT_RECORDER),
    **_same(_FLIGHT_RECORDER, "comm.save_traces_folder", "comm.save_traces_file_prefix", type=str),
    "comm.mode": TorchtitanKey(
        str, "no fake-backend or local-tensor modes; the config is checked against the world size before "
        "Ray starts", accepts=("default",)),
    "memory_estimation.enable": TorchtitanKey(bool, "no memory estimation", accepts=(False,)),
    "memory_estimation.disable_fake_mode": TorchtitanKey(bool, "no memory estimation"),
    "fault_tolerance.enable": TorchtitanKey(
        bool, "no torchft; Ray restarts and resizes the run instead: ray.max_failures, ray.min_workers",
        accepts=(False,)),
    **_same("no torchft (fault_tolerance.enable is off)", "fault_tolerance.process_group",
            "fault_tolerance.semi_sync_method", type=str | None),
    **_same("no torchft (fault_tolerance.enable is off)", "fault_tolerance.process_group_timeout_ms",
            "fault_tolerance.replica_id", "fault_tolerance.group_size", "fault_tolerance.min_replica_size",
            type=int),
    **_same("modules are not imported from the config; your own model is model.name = package.module:attribute",
            "experimental.custom_import", "experimental.custom_args_module", type=str, accepts=("",)),
    "validation.seq_len": TorchtitanKey(
        int, "validation runs at training.seq_len; remove the key (or give it the same value)",
        same_as="training.seq_len"),
    **_loader("validation"),
    "debug.seed": TorchtitanKey(int, "training.seed", alias="training.seed"),
    "debug.deterministic": TorchtitanKey(bool, "training.deterministic", alias="training.deterministic"),
    "debug.deterministic_warn_only": TorchtitanKey(
        bool, "training.deterministic makes an op without a deterministic implementation an error",
        accepts=(False,)),
    "debug.moe_force_load_balance": TorchtitanKey(bool, _MOE),
}
