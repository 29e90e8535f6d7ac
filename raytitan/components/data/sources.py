"""Where the shards come from: seeded synthetic shards, C4 (hub or a mirror of its layout), or files."""

from __future__ import annotations

import gzip
import os

from raytitan.components.storage import list_files, open_binary
from raytitan.components.data.synthetic import default_cache_folder, ensure_synthetic_shards

SHARD_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json", ".parquet")
HUB_C4 = "hf://datasets/allenai/c4"
# The hub's streaming layout of allenai/c4, config "en".
C4_SPLITS = {"c4": "en/c4-train.*-of-01024.json.gz", "c4_validation": "en/c4-validation.*-of-00008.json.gz"}
DATASETS = ("synthetic", "c4_test", "c4", "c4_validation", "files")
# torchtitan's c4_test is a 2,000-document sample of C4 kept in its repository; without a
# dataset_path, raytitan's is generated: this many synthetic documents in C4's format, one shard,
# the same on every machine (not seeded by training.seed).
C4_TEST_DOCS = 2000
C4_TEST_SEED = 0


class DataSourceError(ValueError):
    """A dataset that cannot be read; the message says which key and what to do."""


def resolve_shards(dataset: str, dataset_path: str | None, seed: int, key: str = "training") -> list[str]:
    """Shard paths (local paths or URLs) for a dataset, sorted, checked to exist and be readable."""
    if dataset == "synthetic":
        folder = dataset_path or default_cache_folder(seed)
        return ensure_synthetic_shards(os.path.abspath(os.path.expanduser(folder)), seed)
    if dataset == "c4_test" and not dataset_path:
        return ensure_synthetic_shards(c4_test_folder(), C4_TEST_SEED, num_shards=1, docs_per_shard=C4_TEST_DOCS)
    if dataset in C4_SPLITS:
        root = (dataset_path or HUB_C4).rstrip("/")
        pattern = f"{root}/{C4_SPLITS[dataset]}"
    elif dataset in ("files", "c4_test"):
        if not dataset_path:
            raise DataSourceError(f"{key}.dataset = 'files' needs {key}.dataset_path: a folder, glob or URL of shards")
        pattern = dataset_path
    else:
        raise DataSourceError(f"{key}.dataset: unknown dataset '{dataset}'; use one of {', '.join(DATASETS)}")

    try:
        found = list_files(pattern)
    except Exception as e:  # filesystem clients raise their own types (auth, network, missing bucket)
        raise DataSourceError(f"{key}.dataset_path: cannot list '{pattern}': {e}") from None
    shards = [p for p in found if p.endswith(SHARD_SUFFIXES)]
    if not shards:
        raise DataSourceError(
            f"{key}.dataset_path: no shards ({', '.join(SHARD_SUFFIXES)}) at '{pattern}'"
            + (f"; for a local mirror of {HUB_C4}, point {key}.dataset_path at the folder holding en/"
               if dataset in C4_SPLITS else "")
        )
    _check_readable(shards, key)
    return shards


def c4_test_folder() -> str:
    return os.path.join(os.path.dirname(default_cache_folder(C4_TEST_SEED)), "synthetic-c4_test")


def _check_readable(shards: list[str], key: str) -> None:
    """Empty local files anywhere, and the first shard's first bytes, fail here rather than in a worker."""
    empty = [p for p in shards if "://" not in p and os.path.getsize(p) == 0]
    if empty:
        raise DataSourceError(f"{key}.dataset_path: empty shard file(s): {', '.join(empty[:3])}")
    first = shards[0]
    try:
        with open_binary(first) as f:
            head = (gzip.GzipFile(fileobj=f) if first.endswith(".gz") else f).read(1)
    except Exception as e:
        raise DataSourceError(f"{key}.dataset_path: cannot read {first}: {e}") from None
    if not head:
        raise DataSourceError(f"{key}.dataset_path: {first} holds no data")
