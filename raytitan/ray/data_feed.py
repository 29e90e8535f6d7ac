"""Ray Data feeding: one pipeline per run computes the stream; every rank fetches its rows.

Ray Data reads and tokenizes shards in parallel tasks, outside the trainer processes, with
ordered execution, so its output is exactly ``stream.local_rows``. A ``DataFeeder`` actor
runs the pipeline, groups rows into global batches keyed by their start cursor, and keeps
a bounded number of them ahead. It outlives worker-group restarts; a request for a cursor
it does not hold (a resume) restarts the pipeline there. When the feeder itself dies, Ray
starts it again and resends the requests in flight (``raytitan.ray.launcher.start_feeder``):
the ranks' cursors restart the pipeline where they are.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from raytitan.components.data.loader import BatchLoader
from raytitan.components.data.stream import Cursor, DataSourceError, GlobalBatch, global_batches, shard_plan, \
    shard_rows
from raytitan.components.data.tokenizer import TokenizerSpec

logger = logging.getLogger(__name__)

STALL_WARNING_S = 60.0  # warn when one batch takes longer than this to arrive


class _PackShards:
    """Ray Data UDF: work items (one shard each) -> packed windows with their ids."""

    def __init__(self, shards: list[str], model_config, seq_len: int, seed: int, shuffle_block: int):
        from raytitan.components.data.tokenizer import build_tokenizer

        self.shards, self.seq_len, self.seed, self.shuffle_block = shards, seq_len, seed, shuffle_block
        self.tokenizer = build_tokenizer(model_config)

    def __call__(self, items: dict):
        for epoch, pos, shard, skip in zip(items["epoch"], items["shard_pos"], items["shard"], items["skip"]):
            yield from shard_rows(self.shards[int(shard)], int(shard), int(epoch), int(pos), self.tokenizer,
                                  self.seq_len, int(skip), self.seed, self.shuffle_block, shards=self.shards)


def ray_rows(shards: list[str], model_config, seq_len: int, seed: int, start: Cursor, shuffle_block: int = 0,
             shards_per_read: int = 64):
    """The stream through Ray Data, ordered: identical to ``stream.local_rows``."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    plan = shard_plan(len(shards), seed, start)
    while True:
        # Plan a bounded run of shards at a time: the plan itself is infinite.
        items = [next(plan) for _ in range(shards_per_read)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PackShards,
            fn_constructor_args=(shards, model_config, seq_len, seed, shuffle_block),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
            num_cpus=0.5,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def data_source_error(error: BaseException | None) -> DataSourceError | None:
    """The DataSourceError behind a pipeline failure (Ray Data wraps the one its task raised), so that
    ranks get the data's own error rather than a generic pipeline failure. Its message is one line;
    Ray Data appends its retry advice on the next, which does not apply to it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        original = getattr(error, "cause", None)  # a RayTaskError's own exception
        for candidate in (original, error):
            if isinstance(candidate, DataSourceError):
                return DataSourceError(str(candidate.args[0] if candidate.args else candidate).split("\n", 1)[0])
        error = error.__cause__ or error.__context__ or (original if isinstance(original, BaseException) else None)
    return None


REPLAY_BYTES = 512 * 2**20  # what a feeder may hold of batches already served, for restarts


def replay_batches(checkpoint_interval: int, global_batch_size: int, seq_len: int,
                   budget_bytes: int = REPLAY_BYTES) -> int:
    """How many served batches a feeder keeps: enough for a restart from the newest committed
    checkpoint (at most an interval back, one more while an async save commits), within the
    budget; a restart further back restarts the pipeline, as before."""
    batch_bytes = global_batch_size * ((seq_len + 1) * 4 + 3 * 8)  # int32 tokens, int64 ids
    return max(0, min(2 * checkpoint_interval, budget_bytes // batch_bytes))


class DataFeeder:
    """Serves global batches by start cursor; runs as a threaded Ray actor.

    A batch is dropped once every data-parallel rank has asked for a later one. A rank's
    first request after (re)starting says ``reset``: batches before its cursor belong to
    a worker group that is gone.
    """

    def __init__(self, shards: list[str], model_config, seq_len: int, seed: int,
                 global_batch_size: int, shuffle_block: int = 0, prefetch: int = 4, replay: int = 0):
        # Only what the tokenizer needs: a small immutable value Ray Data can hash and ship.
        self._source = (shards, TokenizerSpec.of(model_config), seq_len, seed, shuffle_block)
        self.global_batch_size, self.prefetch = global_batch_size, max(prefetch, 3)
        self._cond = threading.Condition()
        self._buffer: OrderedDict[Cursor, GlobalBatch] = OrderedDict()
        # The newest ``replay`` batches every rank has moved past: a group restarted from a recent
        # checkpoint asks for them again, and gets them without restarting the pipeline (which
        # would read its shards again from their start up to the cursor).
        self._served: OrderedDict[Cursor, GlobalBatch] = OrderedDict()
        self.replay = replay
        self._positions: dict[int, Cursor] = {}  # reader (training rank) -> newest cursor it asked for
        self._generation = 0
        self._next_start: Cursor | None = None
        self._error: BaseException | None = None
        self.rows_produced = 0
        self.restarts = 0  # of the pipeline: at the first request, then when a cursor is not at hand

    def _produce(self, start: Cursor, generation: int) -> None:
        try:
            rows = ray_rows(*self._source[:4], start, shuffle_block=self._source[4])
            for batch in global_batches(rows, self.global_batch_size, start):
                with self._cond:
                    self._cond.wait_for(lambda: len(self._buffer) < self.prefetch or self._generation != generation)
                    if self._generation != generation:
                        return
                    self._buffer[batch.start] = batch
                    self._next_start = batch.end
                    self.rows_produced += len(batch.tokens)
                    self._cond.notify_all()
        except BaseException as e:  # surfaced to the ranks waiting on a batch
            with self._cond:
                if self._generation == generation:
                    self._error = e
                    self._cond.notify_all()

    def _restart(self, start: Cursor) -> None:
        self._generation += 1
        self.restarts += 1
        self._buffer.clear()
        self._served.clear()
        self._next_start, self._error = start, None
        threading.Thread(target=self._produce, args=(start, self._generation), daemon=True).start()

    def _evict(self, readers: int) -> None:
        while self._buffer:
            first = next(iter(self._buffer))
            if not all(r in self._positions and self._positions[r] > first for r in range(readers)):
                return
            self._served[first] = self._buffer.pop(first)
            while len(self._served) > self.replay:
                self._served.popitem(last=False)
            self._cond.notify_all()

    def _replay_from(self, cursor: Cursor) -> bool:
        """Whether the batches from ``cursor`` on are here (served ones, then the buffer's) with no
        gap up to where the pipeline is: then they go back to the buffer and nothing restarts."""
        if cursor not in self._served:
            return False
        chain, at = [], cursor
        while at in self._served:
            chain.append(self._served[at])
            at = self._served[at].end
        if not (at in self._buffer or at == self._next_start):
            return False
        for batch in chain:
            del self._served[batch.start]
        self._buffer = OrderedDict([*((b.start, b) for b in chain), *self._buffer.items()])
        return True

    def get(self, start: list[int], dp_rank: int, dp_size: int, reset: bool = False,
            reader: int | None = None, readers: int | None = None):
        """This rank's rows of the global batch starting at ``start``, where the next one starts,
        and how many unusable source records the batch's production met.

        ``reader`` / ``readers``: this training rank and how many read the stream; they exceed the
        data-parallel ranks when tensor, context or pipeline parallel ranks share a slice. A batch
        is dropped once every reader has moved past it."""
        reader = dp_rank if reader is None else reader
        readers = dp_size if readers is None else readers
        cursor = Cursor(*start)
        with self._cond:
            if reset:
                self._positions.clear()
                self._replay_from(cursor)
                while self._buffer and next(iter(self._buffer)) < cursor:
                    self._buffer.popitem(last=False)
            # A rank's request one batch ahead of the pipeline (its next request, sent to a feeder
            # that Ray restarted after the one before it) waits: the pipeline gets there.
            ahead = not reset and self._next_start is not None and self._next_start < cursor
            if cursor not in self._buffer and cursor != self._next_start and not ahead:
                self._restart(cursor)
            self._positions[reader] = cursor
            self._evict(readers)
            self._cond.wait_for(lambda: cursor in self._buffer or self._error is not None)
            if self._error is not None:
                if (data_error := data_source_error(self._error)) is not None:
                    raise data_error from None  # the data's own message, not Ray Data's wrapping of it
                raise RuntimeError(f"data pipeline failed: {self._error!r}") from self._error
            batch = self._buffer[cursor]
        tokens, ids = batch.rows_for(dp_rank, dp_size)
        return tokens, ids, batch.end.as_list(), batch.bad_records

    def warm_start(self) -> None:
        """Start the stream at its beginning before any rank asks: a fresh run's pipeline then
        starts while the worker group does, not after."""
        with self._cond:
            if self._next_start is None:
                self._restart(Cursor())

    def stats(self) -> dict:
        with self._cond:
            return {"buffered_batches": len(self._buffer), "replayable_batches": len(self._served),
                    "rows_produced": self.rows_produced, "pipeline_restarts": self.restarts}


class RayFeedLoader(BatchLoader):
    """Worker-side client of the DataFeeder; keeps one request in flight to hide latency."""

    def __init__(self, feeder, global_batch_size: int, dp_rank: int, dp_size: int, reader: int | None = None,
                 readers: int | None = None):
        super().__init__(global_batch_size, dp_rank, dp_size)
        self._feeder, self._reader, self._readers = feeder, reader, readers
        self._inflight: tuple[Cursor, object] | None = None

    def _request(self, start: Cursor, reset: bool = False):
        return self._feeder.get.remote(start.as_list(), self.dp_rank, self.dp_size, reset, self._reader, self._readers)

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
