"""raytitan: elastic, Ray-orchestrated LLM pretraining with PyTorch-native parallelism."""

from __future__ import annotations

from typing import Any

from raytitan.config.job import JobConfig, apply_dict, check_torchtitan_keys, load_toml, set_key

__all__ = ["JobConfig", "fit", "generate", "load_config", "read_metrics"]


def load_config(config: str | JobConfig | dict | None = None, **overrides: Any) -> JobConfig:
    """A JobConfig from a TOML path, a dict, or a JobConfig, with ``section__key=value`` overrides."""
    if isinstance(config, JobConfig):
        resolved = JobConfig.from_dict(config.to_dict())
    elif isinstance(config, dict):
        resolved = JobConfig.from_dict(config)
    else:
        resolved = JobConfig()
        if config is not None:
            apply_dict(resolved, load_toml(config), source=config)
            resolved.job.config_file = config
    for key, value in overrides.items():
        set_key(resolved, key.replace("__", "."), value, source="fit() overrides")
    check_torchtitan_keys(resolved)
    return resolved


def fit(config: str | JobConfig | dict | None = None, **overrides: Any):
    """Train through Ray from a notebook or script; returns the Ray Train ``Result``.

    Example: ``raytitan.fit("configs/llama3_debug.toml", training__steps=20)``.
    """
    from raytitan.ray.launcher import launch

    return launch(load_config(config, **overrides))


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, **kwargs: Any) -> str:
    """Continue ``prompt`` with the model of a checkpoint (a step folder, or a run's checkpoint
    folder for its newest step), on one process. See ``raytitan.tools.sampling.generate``."""
    from raytitan.tools.sampling import generate as _generate

    return _generate(checkpoint, prompt, max_new_tokens, temperature, **kwargs)


def read_metrics(run_dir: str) -> list[dict]:
    """Every metrics line a run logged (its ``metrics.jsonl``), oldest first."""
    from raytitan.components.metrics import read_metrics as _read

    return _read(run_dir)
