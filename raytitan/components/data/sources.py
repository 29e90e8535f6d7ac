"""Where the shards come from: seeded synthetic shards, C4 (hub or a mirror of its layout), or files."""

from __future__ import annotations

import gzip
import json
import logging
import os

from raytitan.components.storage import list_files, open_binary
from raytitan.components.data.stream import DataSourceError, ShardStats, count_windows, describe_shards, read_texts
from raytitan.components.data.synthetic import default_cache_folder, ensure_synthetic_shards

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json", ".parquet")
HUB_C4 = "hf://datasets/allenai/c4"
# The hub's layout of allenai/c4, config "en": <root>/en/c4-train.XXXXX-of-01024.json.gz. A mirror may be
# given by its root, its en/ folder, or any folder of the split's shards (a partial copy included).
C4_SPLITS = {"c4": "c4-train.*", "c4_validation": "c4-validation.*"}
C4_CONFIG = "en"
DATASETS = ("synthetic", "c4_test", "c4", "c4_validation", "files")
# torchtitan's c4_test is a 2,000-document sample of C4 kept in its repository; without a
# dataset_path, raytitan's is generated: this many synthetic documents in C4's format, one shard,
# the same on every machine (not seeded by training.seed).
C4_TEST_DOCS = 2000
C4_TEST_SEED = 0

__all__ = ["DataSourceError", "resolve_shards", "check_enough_data"]


def resolve_shards(dataset: str, dataset_path: str | None, seed: int, key: str = "training") -> list[str]:
    """Shard paths (local paths or URLs) for a dataset, sorted, checked to exist and be readable."""
    if dataset == "synthetic":
        folder = dataset_path or default_cache_folder(seed)
        return ensure_synthetic_shards(os.path.abspath(os.path.expanduser(folder)), seed)
    if dataset == "c4_test" and not dataset_path:
        return ensure_synthetic_shards(c4_test_folder(), C4_TEST_SEED, num_shards=1, docs_per_shard=C4_TEST_DOCS)
    if dataset in C4_SPLITS:
        root = (dataset_path or HUB_C4).rstrip("/")
        patterns = [f"{root}/{C4_CONFIG}/{C4_SPLITS[dataset]}", f"{root}/{C4_SPLITS[dataset]}"]
    elif dataset in ("files", "c4_test"):
        if not dataset_path:
            raise DataSourceError(f"{key}.dataset = 'files' needs {key}.dataset_path: a folder, glob or URL of shards")
        patterns = [dataset_path]
    else:
        raise DataSourceError(f"{key}.dataset: unknown dataset '{dataset}'; use one of {', '.join(DATASETS)}")
    shards = []
    for pattern in patterns:  # the first that matches: a c4 mirror's root, then the folder of shards
        try:
            found = list_files(pattern)
        except FileNotFoundError:
            continue
        except Exception as e:  # filesystem clients raise their own types (auth, network, missing bucket)
            raise DataSourceError(f"{key}.dataset_path: cannot list '{pattern}': {e}") from None
        shards = [p for p in found if p.endswith(SHARD_SUFFIXES)]
        if shards:
            break
    if not shards:
        raise DataSourceError(
            f"{key}.dataset_path: no shards ({', '.join(SHARD_SUFFIXES)}) at " + " or ".join(map(repr, patterns))
            + (f"; for a mirror of {HUB_C4}, point {key}.dataset_path at its root (the folder holding "
               f"{C4_CONFIG}/), at {C4_CONFIG}/ itself, or at any folder of {C4_SPLITS[dataset]} shards"
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
    _check_schema(first, key)


SCHEMA_SAMPLE = 1000  # json records of the first shard read to check its schema


def _check_schema(path: str, key: str) -> None:
    """The first shard's records must hold a string ``text``: a whole dataset in another schema would
    otherwise start, skip every record and never make a batch."""
    try:
        if path.endswith(".parquet"):
            texts = read_texts(path, ShardStats(), chunk_docs=1)
            next(texts, None)  # opening the file checks its schema
            texts.close()
            return
        with open_binary(path) as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            objects, fields, kinds = 0, {}, set()
            for line in stream:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    objects += 1
                    if isinstance(record.get("text"), str):
                        return
                    fields.update(dict.fromkeys(record))
                    if "text" in record:
                        kinds.add(type(record["text"]).__name__)
                if objects >= SCHEMA_SAMPLE:
                    break
    except DataSourceError as e:
        raise DataSourceError(f"{key}.dataset_path: {e}") from None
    except Exception as e:  # a read error past the first bytes: the shard reader skips what it cannot use
        logger.warning("%s.dataset_path: could not check the records of %s: %s", key, path, e)
        return
    if not objects:
        raise DataSourceError(f"{key}.dataset_path: {path} holds no JSON object records; C4-format json shards "
                              'need one {"text": "..."} object per line')
    if kinds:
        raise DataSourceError(f"{key}.dataset_path: {path}: field 'text' holds {', '.join(sorted(kinds))}, not a "
                              f"string, in the first {objects} records; C4-format shards need the document text "
                              "as a string field 'text'")
    raise DataSourceError(f"{key}.dataset_path: {path}: no 'text' field in the first {objects} records (fields: "
                          f"{', '.join(list(fields)[:10])}); C4-format shards need the document text as a string "
                          "field 'text'")


SCAN_SHARDS = 8  # shards read, at most, to count a dataset's windows before launch


def check_enough_data(shards: list[str], tokenizer, seq_len: int, global_batch: int, key: str = "training",
                      scan_shards: int = SCAN_SHARDS) -> int:
    """Refuse, before launch, a dataset that holds fewer windows than one global batch.

    Reads shards in order until one global batch of windows is certain (normally part of
    the first shard). A dataset of more than ``scan_shards`` shards that has not shown a
    batch by then is not read further here; the stream itself refuses one without a window.
    Returns the windows counted.
    """
    total, counts = 0, []
    for path in shards[:scan_shards]:
        windows, tokens, stats = count_windows(path, tokenizer, seq_len, limit=global_batch - total)
        total += windows
        counts.append((path, tokens, stats))
        if total >= global_batch:
            return total
    if len(shards) > scan_shards:
        logger.warning("%s.dataset_path: the first %d of %d shards hold %d window(s) of seq_len + 1 = %d tokens, "
                       "fewer than one global batch (%d): %s", key, scan_shards, len(shards), total, seq_len + 1,
                       global_batch, describe_shards(counts))
        return total
    raise DataSourceError(
        f"{key}.dataset_path: the dataset holds {total} window(s) of seq_len + 1 = {seq_len + 1} tokens per epoch, "
        f"fewer than one global batch ({global_batch}) ({describe_shards(counts)}). Add data, fix the skipped "
        "records, or lower training.seq_len or the global batch")
