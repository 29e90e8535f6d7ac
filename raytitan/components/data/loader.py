"""Per-rank view of the global batch stream, with a resumable, world-size-free state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from raytitan.components.data.stream import Cursor, GlobalBatch, global_batches, local_rows


@dataclass
class RankBatch:
    tokens: torch.Tensor  # [rows, seq_len + 1] int64: this data-parallel rank's rows
    ids: np.ndarray  # [rows, 3]: (epoch, shard, window) of each row


class BatchLoader:
    """Hands out this rank's rows of consecutive global batches; subclasses say where they come from.

    The checkpointed state is only (cursor, sequences consumed): the same on every rank,
    so it restores onto any data-parallel degree.
    """

    def __init__(self, global_batch_size: int, dp_rank: int, dp_size: int):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by dp {dp_size}")
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.cursor = Cursor()
        self.consumed = 0
        self.bad_records = 0  # unusable source records met so far by this process (a metric, not state)

    def _fetch(self, start: Cursor) -> tuple[np.ndarray, np.ndarray, Cursor, int]:
        """(this rank's tokens, their ids, the next cursor, unusable records met) for a global batch."""
        raise NotImplementedError

    def next_batch(self) -> RankBatch:
        tokens, ids, end, bad = self._fetch(self.cursor)
        self.cursor, self.consumed = end, self.consumed + self.global_batch_size
        self.bad_records += bad
        return RankBatch(torch.from_numpy(tokens.astype(np.int64)), ids)

    def metrics(self) -> dict[str, float]:
        """What this loader reports in each logged step's metrics (``data/...``)."""
        return {"data/bad_records": self.bad_records}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.as_list(), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor(*[int(x) for x in state["cursor"]])
        self.consumed = int(state["consumed"])


class LocalLoader(BatchLoader):
    """Computes the stream in this process: for torchrun runs and tests."""

    def __init__(self, shards: list[str], tokenizer, seq_len: int, seed: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, shuffle_block: int = 0):
        super().__init__(global_batch_size, dp_rank, dp_size)
        self._source = (shards, tokenizer, seq_len, seed, shuffle_block)
        self._it: Iterator[GlobalBatch] | None = None
        self._next_start: Cursor | None = None
        self._latencies: list[float] = []
        self._tokens, self._since = 0, time.perf_counter()

    def _fetch(self, start: Cursor) -> tuple[np.ndarray, np.ndarray, Cursor, int]:
        t0 = time.perf_counter()
        if self._it is None or self._next_start != start:
            self._it = global_batches(local_rows(*self._source[:4], start, self._source[4]),
                                      self.global_batch_size, start)
        batch = next(self._it)
        self._next_start = batch.end
        self._latencies.append(time.perf_counter() - t0)
        self._tokens += len(batch.tokens) * (batch.tokens.shape[1] - 1)
        tokens, ids = batch.rows_for(self.dp_rank, self.dp_size)
        return tokens, ids, batch.end, batch.bad_records

    def metrics(self) -> dict[str, float]:
        """Besides the base counters: tokens/s this rank's own pipeline produced (every rank computes
        the whole global batch), over the wall time since the last call, and the time each batch
        took to compute (the request latency: it is computed when the step asks for it). Nothing
        is computed ahead, so there are no buffered batches to report."""
        out = super().metrics()
        now = time.perf_counter()
        if self._latencies:
            out["data/tokens_per_s"] = self._tokens / max(now - self._since, 1e-9)
            out["data/request_latency_mean_s"] = sum(self._latencies) / len(self._latencies)
            out["data/request_latency_max_s"] = max(self._latencies)
        self._latencies, self._tokens, self._since = [], 0, now
        return out
