"""Command-line tools over finished or running runs: checkpoints, conversion, sampling."""
