"""The training rank's side of Ray data feeding: a ``BatchLoader`` that asks its node's relay
(or the feeder) for its rows, one request ahead.

Kept apart from ``raytitan.ray.data_feed`` so that the data plane's own processes (the feeder,
its packers, the read-ahead gate, the relays) never import torch: each would pay about a second
of CPU for it at every start."""

from __future__ import annotations

import logging
import time

import numpy as np

from raytitan.components.data.loader import BatchLoader
from raytitan.components.data.stream import Cursor
from raytitan.ray.data_feed import ask, node_relay

logger = logging.getLogger(__name__)

STALL_WARNING_S = 60.0  # warn when one batch takes longer than this to arrive


class RayFeedLoader(BatchLoader):
    """Worker-side client of the DataFeeder; keeps one request in flight to hide latency.

    With ``relays`` (the launch's id) it asks its node's ``DataRelay`` for the feed ``purpose``,
    or the feeder itself where the node has none."""

    def __init__(self, feeder, global_batch_size: int, dp_rank: int, dp_size: int, reader: int | None = None,
                 readers: int | None = None, relays: str | None = None, purpose: str = "train"):
        super().__init__(global_batch_size, dp_rank, dp_size)
        self._feeder, self._reader, self._readers = feeder, reader, readers
        self._relay, self._purpose = node_relay(relays), purpose
        self._inflight: tuple[Cursor, object] | None = None
        self._latencies: list[float] = []  # seconds from sending each request to its answer, since the last log

    def _request(self, start: Cursor, reset: bool = False):
        ref = ask(self._feeder, self._relay, self._purpose, start, self.dp_rank, self.dp_size, reset, self._reader,
                  self._readers)
        sent = time.perf_counter()
        # Timed when the answer arrives, not when the step asks for it (one request is always ahead).
        ref.future().add_done_callback(lambda _: self._latencies.append(time.perf_counter() - sent))
        return ref

    def _fetch(self, start: Cursor) -> tuple[np.ndarray, np.ndarray, Cursor, int]:
        import ray

        # No request in flight for this cursor means this rank just (re)started here.
        ref = self._inflight[1] if self._inflight and self._inflight[0] == start else self._request(start, reset=True)
        waited = 0.0
        while not ray.wait([ref], timeout=STALL_WARNING_S)[0]:
            waited += STALL_WARNING_S
            logger.warning(
                "waited %.0fs for data at cursor %s. If this persists, the Ray Data pipeline may be starved: "
                "it needs CPUs the training workers do not reserve (free now: %s)",
                waited, start.as_list(), {k: v for k, v in ray.available_resources().items() if k in ("CPU", "memory")},
            )
        tokens, ids, end, bad = ray.get(ref)
        end = Cursor(*end)
        self._inflight = (end, self._request(end))
        return tokens, ids, end, bad

    def metrics(self) -> dict[str, float]:
        """Besides the base counters: this rank's request latency (mean and max since the last call);
        on the first reader (rank 0, which logs), the feeder's tokens/s produced, batches buffered
        ahead, packing actors and one packer's rate. A feeder that does not answer in 5 s is left out."""
        import ray

        out = super().metrics()
        latencies, self._latencies = self._latencies, []
        if latencies:
            out["data/request_latency_mean_s"] = sum(latencies) / len(latencies)
            out["data/request_latency_max_s"] = max(latencies)
        if (self._reader if self._reader is not None else self.dp_rank) == 0:
            try:
                stats = ray.get(self._feeder.stats.remote(True), timeout=5)
            except Exception as e:  # restarting or gone: the next log has it
                logger.debug("no feeder stats this time: %r", e)
                return out
            out["data/tokens_per_s"] = stats["tokens_per_s"]
            out["data/buffered_batches"] = stats["buffered_batches"]
            out["data/packers"] = stats["packers"]
            if stats.get("packer_tokens_per_s"):
                out["data/packer_tokens_per_s"] = stats["packer_tokens_per_s"]
        return out
