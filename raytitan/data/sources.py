"""Where the shards come from: the seeded synthetic set, or C4-format files on disk."""

from __future__ import annotations

import glob
import os

from raytitan.data.synthetic import default_cache_folder, ensure_synthetic_shards

SHARD_SUFFIXES = (".json.gz", ".jsonl", ".json", ".jsonl.gz")


class DataSourceError(ValueError):
    """A dataset that cannot be read; the message says which key and what to do."""


def resolve_shards(training) -> list[str]:
    """Absolute shard paths for ``training.dataset`` / ``training.dataset_path``, sorted."""
    if training.dataset == "synthetic":
        folder = training.dataset_path or default_cache_folder(training.seed)
        return ensure_synthetic_shards(os.path.abspath(os.path.expanduser(folder)), training.seed)
    if training.dataset == "c4":
        if not training.dataset_path:
            raise DataSourceError(
                "training.dataset = 'c4' needs training.dataset_path: a folder or glob of C4 json.gz shards"
            )
        return _local_shards(training.dataset_path)
    raise DataSourceError(f"training.dataset: unknown dataset '{training.dataset}'; use 'synthetic' or 'c4'")


def _local_shards(path: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in os.listdir(path)]
    else:
        candidates = glob.glob(path)
        if not candidates:
            raise DataSourceError(f"training.dataset_path: nothing matches '{path}'")
    shards = sorted(os.path.abspath(p) for p in candidates if p.endswith(SHARD_SUFFIXES) and os.path.isfile(p))
    if not shards:
        raise DataSourceError(
            f"training.dataset_path: no shards ({', '.join(SHARD_SUFFIXES)}) in '{path}'"
        )
    empty = [p for p in shards if os.path.getsize(p) == 0]
    if empty:
        raise DataSourceError(f"training.dataset_path: empty shard file(s): {', '.join(empty[:3])}")
    return shards
