"""The deterministic packed-sequence stream and its resumable position.

The stream is a pure function of (shard list, tokenizer, seq_len, seed):
  epoch e visits the shards in a seeded order; each shard's documents are tokenized as
  BOS text EOS, concatenated, and cut into non-overlapping windows of seq_len + 1 tokens
  (a shard's last partial window is dropped). Every window is identified by
  (epoch, shard, window). Global batch k is rows [k*G, (k+1)*G) of this order, and
  data-parallel rank d of D takes the d-th contiguous 1/D of it.

A ``Cursor`` (epoch, position in that epoch's shard order, window in that shard) names the
next window: it is all a checkpoint needs to resume, on any number of ranks.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import astuple, dataclass

import numpy as np

logger = logging.getLogger(__name__)

ID_COLUMNS = ("epoch", "shard", "window")


@dataclass(frozen=True, order=True)
class Cursor:
    epoch: int = 0
    shard_pos: int = 0
    window: int = 0

    def as_list(self) -> list[int]:
        return list(astuple(self))


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard visiting order of one epoch: a seeded permutation, different every epoch."""
    order = list(range(num_shards))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def read_texts(path: str, chunk_docs: int = 512) -> Iterator[list[str]]:
    """Texts of a C4-format shard (json lines, gzip or not), in file order, a chunk at a time.

    Lines that are not JSON objects with a non-empty string ``text`` are skipped and counted.
    """
    opener = gzip.open if path.endswith(".gz") else open
    skipped, chunk = 0, []
    with opener(path, "rb") as raw:
        for line in io.BufferedReader(raw):
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                text = None
            if not isinstance(text, str) or not text:
                skipped += 1
                continue
            chunk.append(text)
            if len(chunk) == chunk_docs:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
    if skipped:
        logger.warning("skipped %d malformed or empty records in %s", skipped, path)


def pack_shard(path: str, tokenizer, seq_len: int, skip: int = 0, rows_per_chunk: int = 256) -> Iterator[np.ndarray]:
    """Windows [n, seq_len + 1] (int32) of one shard, in order, from window index ``skip`` on.

    Yields chunks of up to ``rows_per_chunk`` windows, so memory stays bounded by a chunk.
    """
    width = seq_len + 1
    buffer: list[int] = []
    window, ready = 0, []
    for texts in read_texts(path):
        for ids in tokenizer.encode_batch(texts):
            buffer.append(tokenizer.bos_id)
            buffer.extend(ids)
            buffer.append(tokenizer.eos_id)
        full = len(buffer) // width
        if full:
            block = np.asarray(buffer[: full * width], dtype=np.int32).reshape(full, width)
            del buffer[: full * width]
            first = max(0, skip - window)
            if first < full:
                ready.append(block[first:])
            window += full
            while sum(len(r) for r in ready) >= rows_per_chunk:
                stacked = np.concatenate(ready)
                yield stacked[:rows_per_chunk]
                ready = [stacked[rows_per_chunk:]] if len(stacked) > rows_per_chunk else []
    if ready:
        yield np.concatenate(ready)


def shard_rows(path: str, shard: int, epoch: int, shard_pos: int, tokenizer, seq_len: int, skip: int) -> Iterator[dict]:
    """Batches of rows with their ids: {"tokens", "epoch", "shard", "shard_pos", "window"}."""
    window = skip
    for tokens in pack_shard(path, tokenizer, seq_len, skip):
        n = len(tokens)
        yield {
            "tokens": tokens,
            "epoch": np.full(n, epoch, dtype=np.int64),
            "shard": np.full(n, shard, dtype=np.int64),
            "shard_pos": np.full(n, shard_pos, dtype=np.int64),
            "window": np.arange(window, window + n, dtype=np.int64),
        }
        window += n


def shard_plan(num_shards: int, seed: int, start: Cursor) -> Iterator[dict]:
    """The (epoch, shard_pos, shard, skip) work items from ``start`` on, forever."""
    for epoch in itertools.count(start.epoch):
        order = epoch_order(num_shards, seed, epoch)
        first = start.shard_pos if epoch == start.epoch else 0
        for pos in range(first, num_shards):
            skip = start.window if (epoch == start.epoch and pos == first) else 0
            yield {"epoch": epoch, "shard_pos": pos, "shard": order[pos], "skip": skip}


def local_rows(shards: list[str], tokenizer, seq_len: int, seed: int, start: Cursor) -> Iterator[dict]:
    """The stream computed in this process (torchrun runs, tests, the reference order)."""
    for item in shard_plan(len(shards), seed, start):
        yield from shard_rows(shards[item["shard"]], item["shard"], item["epoch"], item["shard_pos"],
                              tokenizer, seq_len, item["skip"])


@dataclass
class GlobalBatch:
    tokens: np.ndarray  # [G, seq_len + 1] int32
    ids: np.ndarray  # [G, 3] int64: (epoch, shard, window)
    start: Cursor
    end: Cursor  # cursor of the next global batch

    def rows_for(self, dp_rank: int, dp_size: int) -> tuple[np.ndarray, np.ndarray]:
        per_rank = len(self.tokens) // dp_size
        sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return self.tokens[sl], self.ids[sl]


def global_batches(row_batches: Iterator[dict], global_batch_size: int, start: Cursor) -> Iterator[GlobalBatch]:
    """Regroup a row stream (any chunking) into global batches of exactly G rows."""
    pending: list[dict] = []
    have = 0
    for batch in row_batches:
        pending.append(batch)
        have += len(batch["tokens"])
        while have >= global_batch_size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            take = {k: v[:global_batch_size] for k, v in merged.items()}
            rest = {k: v[global_batch_size:] for k, v in merged.items()}
            pending, have = ([rest], len(rest["tokens"])) if len(rest["tokens"]) else ([], 0)
            last = -1
            end = Cursor(int(take["epoch"][last]), int(take["shard_pos"][last]), int(take["window"][last]) + 1)
            ids = np.stack([take[c] for c in ID_COLUMNS], axis=1)
            yield GlobalBatch(take["tokens"], ids, start, end)
            start = end
