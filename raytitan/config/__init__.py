"""The run configuration: its sections and how it is read (``job``), and what it means on a
given world size (``plan``, imported on its own: it loads torch and the model code)."""

from raytitan.config.job import ConfigError, JobConfig, apply_dict, load_toml, parse_args, set_key, to_toml

__all__ = ["ConfigError", "JobConfig", "apply_dict", "load_toml", "parse_args", "set_key", "to_toml"]
