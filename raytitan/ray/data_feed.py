"""Ray Data feeding: one pipeline per run computes the stream; every rank fetches its rows.

Ray Data reads and tokenizes shards in parallel tasks, outside the trainer processes, with
ordered execution, so its output is exactly ``stream.local_rows``. A ``DataFeeder`` actor
runs the pipeline, groups rows into global batches keyed by their start cursor, and keeps
a bounded number of them ahead. It outlives worker-group restarts; a request for a cursor
it does not hold (a resume) restarts the pipeline there. When the feeder itself dies, Ray
starts it again and resends the requests in flight (``raytitan.ray.launcher.start_feeder``):
the ranks' cursors restart the pipeline where they are.

Ranks ask their node's ``DataRelay`` (one per node and launch, started by the launcher), which
fetches each global batch once from the feeder and cuts every rank's slice, so the feeder's
work per step grows with the nodes, not the ranks; a rank on a node without a relay asks the
feeder itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from raytitan.components.data.stream import Cursor, DataSourceError, GlobalBatch, global_batches, shard_plan, \
    shard_rows
from raytitan.components.data.tokenizer import TokenizerSpec

logger = logging.getLogger(__name__)


# The CPUs the launcher leaves free for the data pipeline on a CPU cluster
# (``raytitan.ray.launcher.DATA_CPUS``; tests/data/test_ray_feed.py checks they agree): the pool's
# size before any demand is known. Growing past it takes only CPUs free at that moment.
RESERVED_CPUS = 1.0
CPUS_PER_PACKER = 0.5
MAX_PACKERS = 256  # one feeder's pipeline; more would want a feeder per group of ranks (issue #20 item 2)
HEADROOM = 1.25  # size the pool for this much more than the trainers consume


def pool_size(current: int, free_cpus: float, demand_tokens_per_s: float | None = None,
              packer_tokens_per_s: float | None = None, starving: bool = False,
              cpus_per_packer: float = CPUS_PER_PACKER, most: int = MAX_PACKERS) -> int:
    """How many packing actors the next run of the pipeline gets.

    ``current``: the run now (0 before the first). ``free_cpus``: CPUs Ray has free on any node,
    with the current pool's own counted as free. Without a measured demand, the reserved share.
    With one (tokens/s the trainers consume, and one packer's measured rate), enough for it with
    ``HEADROOM``; a pipeline that starves the ranks gets at least double what it has. It never
    shrinks below the reserved share and never takes more CPUs than are free."""
    base = max(1, int(RESERVED_CPUS / cpus_per_packer + 1e-9))
    want = max(base, current)
    if demand_tokens_per_s and packer_tokens_per_s:
        want = max(base, math.ceil(HEADROOM * demand_tokens_per_s / packer_tokens_per_s))
    if starving:
        want = max(want, 2 * max(current, 1))
    affordable = max(base, int(free_cpus / cpus_per_packer + 1e-9))
    return max(1, min(want, most, affordable))


class _Gate:
    """Admits shard items to the packers no further than ``ahead`` items past the consumer.

    Ray Data runs every item of a dataset as fast as its actors allow, whatever the consumer
    takes; with small shards, a run of 64 items was many epochs read ahead of training. Each
    packer asks here before reading item ``k`` and waits until the consumer has reached item
    ``k - ahead``; ``ahead`` covers the rows the consumer may hold ahead (``read_ahead_rows``,
    measured in rows per item as items finish) plus two items per packer (with one, a packer could
    wait at the gate for its next item while Ray Data still held its previous item's output: seen
    with a single packer)."""

    def __init__(self, read_ahead_rows: int, packers: int, first_item: int = 0):
        import asyncio

        self.read_ahead_rows, self.packers = max(1, read_ahead_rows), packers
        self.progress = first_item - 1  # every item up to here is consumed (or finished with no rows)
        self.finished: dict[int, int] = {}  # item -> rows, for items past progress
        self.cut = None  # items after this are not admitted: the run ends there
        self.admitted = first_item - 1
        self.items = self.rows = self.tokens = 0
        self.busy_s = 0.0
        self._changed = asyncio.Condition()

    def ahead(self) -> int:
        per_item = self.rows / self.items if self.items else 0
        extra = math.ceil(self.read_ahead_rows / per_item) if per_item else 0
        return 2 * self.packers + min(extra, 4 * self.packers + 4)

    async def admit(self, item: int) -> bool:
        async with self._changed:
            await self._changed.wait_for(lambda: item <= self.progress + self.ahead()
                                         or (self.cut is not None and item > self.cut))
            if self.cut is not None and item > self.cut:
                return False
            self.admitted = max(self.admitted, item)
            return True

    async def done(self, item: int, rows: int, tokens: int, busy_s: float) -> None:
        async with self._changed:
            self.items, self.rows, self.tokens, self.busy_s = (self.items + 1, self.rows + rows,
                                                               self.tokens + tokens, self.busy_s + busy_s)
            if item > self.progress:
                self.finished[item] = rows
            self._advance()

    async def consumed(self, item: int) -> None:
        async with self._changed:
            if item > self.progress:
                self.progress = item - 1  # items before it are done; it itself still streams
                self._advance()

    def _advance(self) -> None:
        for k in [k for k in self.finished if k <= self.progress]:
            del self.finished[k]
        while self.finished.get(self.progress + 1) == 0:  # an item with no rows never reaches the consumer
            del self.finished[self.progress + 1]
            self.progress += 1
        self._changed.notify_all()

    async def end_run(self) -> int:
        """Admit nothing more in this run; the last item admitted (the run ends after it)."""
        async with self._changed:
            self.cut = self.admitted
            self._changed.notify_all()
            return self.cut

    def packer_tokens_per_s(self) -> float | None:
        return self.tokens / self.busy_s if self.busy_s > 0 and self.items else None

    def last_admitted(self) -> int:
        return self.admitted

    def report(self) -> tuple[int, float | None]:
        return self.admitted, self.packer_tokens_per_s()


class _PackShards:
    """Ray Data UDF: work items (one shard each) -> packed windows with their ids."""

    def __init__(self, shards: list[str], model_config, seq_len: int, seed: int, shuffle_block: int, gate=None):
        from raytitan.components.data.tokenizer import build_tokenizer

        self.shards, self.seq_len, self.seed, self.shuffle_block = shards, seq_len, seed, shuffle_block
        self.tokenizer = build_tokenizer(model_config)
        self.gate = gate

    def _admitted(self, item: int) -> bool:
        import ray

        if self.gate is None:
            return True
        try:
            return ray.get(self.gate.admit.remote(item))
        except ray.exceptions.RayActorError:  # the consumer is gone: so is this run
            return False

    def __call__(self, items: dict):
        import time

        for k, epoch, pos, shard, skip in zip(items["item"], items["epoch"], items["shard_pos"], items["shard"],
                                              items["skip"]):
            if not self._admitted(int(k)):
                continue
            rows = tokens = 0
            busy, t0 = 0.0, time.perf_counter()
            for batch in shard_rows(self.shards[int(shard)], int(shard), int(epoch), int(pos), self.tokenizer,
                                    self.seq_len, int(skip), self.seed, self.shuffle_block, shards=self.shards):
                n = len(batch["tokens"])
                rows, tokens = rows + n, tokens + n * (batch["tokens"].shape[1] - 1)  # training tokens
                busy += time.perf_counter() - t0
                yield {**batch, "item": np.full(len(batch["tokens"]), k, dtype=np.int64)}
                t0 = time.perf_counter()
            busy += time.perf_counter() - t0
            if self.gate is not None:
                self.gate.done.remote(int(k), rows, tokens, busy)


@dataclass
class PipelineState:
    """What the pipeline tells its feeder (and the metrics): the pool it runs and how fast a packer is."""

    packers: int = 0
    packer_tokens_per_s: float | None = None
    items_admitted: int = 0  # shard items read, over the runs of this pipeline
    runs: int = 0


class Halt:
    """Ends a pipeline from another thread (the feeder, restarting its pipeline elsewhere): its
    gate is killed, so packers waiting there skip their items instead of holding their CPUs, and
    ``ray_rows`` returns at its next step. A new pipeline may otherwise find no CPUs for its pool
    while the old one's packers wait for a consumer that is gone."""

    def __init__(self):
        self._event, self._lock, self._gate = threading.Event(), threading.Lock(), None

    def __call__(self) -> bool:
        return self._event.is_set()

    def watch(self, gate) -> None:
        """The current run's gate; killed at once if the pipeline was already halted."""
        with self._lock:
            self._gate = gate
            if self._event.is_set():
                _kill_quietly(gate)

    def set(self) -> None:
        with self._lock:
            self._event.set()
            if self._gate is not None:
                _kill_quietly(self._gate)


def _kill_quietly(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # gone already, or Ray itself is shutting down
        pass


def ray_rows(shards: list[str], model_config, seq_len: int, seed: int, start: Cursor, shuffle_block: int = 0,
             shards_per_read: int = 64, read_ahead_rows: int = 256, demand=None, state: PipelineState | None = None,
             resize_every_s: float = 30.0, packers: int | None = None, cpus_per_packer: float = CPUS_PER_PACKER,
             halt: Halt | None = None):
    """The stream through Ray Data, ordered: identical to ``stream.local_rows``.

    The plan is cut into runs of at most ``shards_per_read`` shard items, one Ray Data dataset
    each, with a pool of packing actors sized by ``pool_size`` from the CPUs Ray has free and
    ``demand()`` (``(tokens/s the trainers consume or None, starving)``). A run ends early, at an
    item boundary, when the demand wants another size (checked every ``resize_every_s``). A gate
    keeps the packers at most about ``read_ahead_rows`` rows (and two items per packer) ahead of
    what this generator has yielded. ``packers`` fixes the pool's size (a benchmark's, or the
    validation stream's); ``cpus_per_packer`` is the Ray CPUs each packing actor reserves.
    ``halt``: set from another thread, the stream ends (see ``Halt``)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    state = state if state is not None else PipelineState()
    plan = shard_plan(len(shards), seed, start)
    index = 0  # of the next item in the plan
    pending: list[dict] = []  # items planned for a run that ended before admitting them
    while not (halt and halt()):
        items = pending + [next(plan) for _ in range(max(0, shards_per_read - len(pending)))]
        items = [{**item, "item": index + i} for i, item in enumerate(items)]
        wanted, starving = demand() if demand else (None, False)
        free = ray.available_resources().get("CPU", 0.0) + state.packers * cpus_per_packer
        size = packers or pool_size(state.packers, free, wanted, state.packer_tokens_per_s, starving)
        state.packers, state.runs = size, state.runs + 1
        gate = ray.remote(_Gate).options(num_cpus=0).remote(read_ahead_rows, size, index)
        if halt:
            halt.watch(gate)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PackShards,
            fn_constructor_args=(shards, model_config, seq_len, seed, shuffle_block, gate),
            batch_size=1,
            # The reserved share starts at once; the rest as Ray Data's autoscaler finds them busy.
            compute=ray.data.ActorPoolStrategy(min_size=size if packers else min(size, pool_size(0, 0.0)),
                                               max_size=size),
            num_cpus=cpus_per_packer,
        )
        last_seen, cut, checked = -1, None, time.monotonic()
        read_before = state.items_admitted
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                if halt and halt():
                    return
                item = int(batch["item"][-1])
                if item != last_seen:
                    gate.consumed.remote(int(batch["item"][0]))
                    last_seen = item
                    admitted, rate = ray.get(gate.report.remote())
                    state.items_admitted = read_before + admitted - index + 1
                    state.packer_tokens_per_s = rate or state.packer_tokens_per_s
                yield {k: v for k, v in batch.items() if k != "item"}
                if demand and not packers and cut is None and time.monotonic() - checked > resize_every_s:
                    checked = time.monotonic()
                    rate = ray.get(gate.packer_tokens_per_s.remote())
                    state.packer_tokens_per_s = rate or state.packer_tokens_per_s
                    wanted, starving = demand()
                    free = ray.available_resources().get("CPU", 0.0) + size * cpus_per_packer
                    if pool_size(size, free, wanted, state.packer_tokens_per_s, starving) != size:
                        cut = ray.get(gate.end_run.remote())  # the rest of this run goes to the next, resized
            if halt and halt():  # its gate is gone
                return
            rate = ray.get(gate.packer_tokens_per_s.remote())
            state.packer_tokens_per_s = rate or state.packer_tokens_per_s
        finally:
            try:
                state.items_admitted = read_before + ray.get(gate.last_admitted.remote(), timeout=10) - index + 1
            except Exception:  # a gate that is gone admits nothing more
                pass
            _kill_quietly(gate)
        done = cut if cut is not None else items[-1]["item"]
        pending = [{k: v for k, v in item.items() if k != "item"} for item in items if item["item"] > done]
        index = done + 1


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


INLINE_BYTES = 100 * 1024  # Ray returns results up to this size inline (ray_config max_direct_call_object_size)
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
                 global_batch_size: int, shuffle_block: int = 0, prefetch: int = 4, replay: int = 0,
                 packers: int | None = None, cpus_per_packer: float = CPUS_PER_PACKER):
        # Only what the tokenizer needs: a small immutable value Ray Data can hash and ship.
        self._source = (shards, TokenizerSpec.of(model_config), seq_len, seed, shuffle_block)
        self.global_batch_size, self.prefetch = global_batch_size, max(prefetch, 3)
        self.seq_len = seq_len
        self.packers, self.cpus_per_packer = packers, cpus_per_packer  # see ``ray_rows``
        self.pipeline = PipelineState()  # the packing pool's size and rate, across pipeline restarts
        self._asked: deque[float] = deque(maxlen=32)  # when each new batch was first asked for
        self._starving = False  # a rank asked while no batch was ready ahead of the pipeline's start-up
        self._produced_in_generation = 0
        self._last_stats = (time.monotonic(), 0)
        self._cond = threading.Condition()
        self._buffer: OrderedDict[Cursor, GlobalBatch] = OrderedDict()
        # The newest ``replay`` batches every rank has moved past: a group restarted from a recent
        # checkpoint asks for them again, and gets them without restarting the pipeline (which
        # would read its shards again from their start up to the cursor).
        self._served: OrderedDict[Cursor, GlobalBatch] = OrderedDict()
        self.replay = replay
        self._positions: dict[int, Cursor] = {}  # reader (training rank) -> newest cursor it asked for
        self._generation = 0
        self._halt = Halt()  # ends the current pipeline when another replaces it
        self._next_start: Cursor | None = None
        self._error: BaseException | None = None
        self.rows_produced = 0
        self.restarts = 0  # of the pipeline: at the first request, then when a cursor is not at hand
        self.requests = 0  # calls answered: ranks' requests, relays' fetches and position reports
        self._newest_asked: Cursor | None = None  # the newest cursor a relay fetched (demand)
        self._refs: dict = {}  # cursor -> the batch put in the object store for relays (large batches)

    def _produce(self, start: Cursor, generation: int, halt: Halt) -> None:
        try:
            rows = ray_rows(*self._source[:4], start, shuffle_block=self._source[4],
                            read_ahead_rows=self.prefetch * self.global_batch_size, demand=self.demand,
                            state=self.pipeline, packers=self.packers, cpus_per_packer=self.cpus_per_packer,
                            halt=halt)
            for batch in global_batches(rows, self.global_batch_size, start):
                with self._cond:
                    self._cond.wait_for(lambda: len(self._buffer) < self.prefetch or self._generation != generation)
                    if self._generation != generation:
                        return
                    self._buffer[batch.start] = batch
                    self._next_start = batch.end
                    self.rows_produced += len(batch.tokens)
                    self._produced_in_generation += 1
                    self._cond.notify_all()
        except BaseException as e:  # surfaced to the ranks waiting on a batch
            with self._cond:
                if self._generation == generation:
                    self._error = e
                    self._cond.notify_all()

    def _restart(self, start: Cursor) -> None:
        self._halt.set()  # the previous pipeline ends now, not when it next yields a row
        self._halt = Halt()
        self._generation += 1
        self.restarts += 1
        self._buffer.clear()
        self._served.clear()
        self._next_start, self._error = start, None
        self._produced_in_generation = 0
        self._asked.clear()
        self._newest_asked = None
        self._refs.clear()
        threading.Thread(target=self._produce, args=(start, self._generation, self._halt), daemon=True).start()

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

    def _take(self, cursor: Cursor, reset: bool, readers: int, place) -> GlobalBatch:
        """The global batch at ``cursor``, once the pipeline has it; ``place()`` records the asker's
        position (under the lock, before the buffer is trimmed)."""
        with self._cond:
            self.requests += 1
            if reset:
                self._positions.clear()
                self._newest_asked = None
                self._replay_from(cursor)
                while self._buffer and next(iter(self._buffer)) < cursor:
                    self._buffer.popitem(last=False)
            # A rank's request one batch ahead of the pipeline (its next request, sent to a feeder
            # that Ray restarted after the one before it) waits: the pipeline gets there.
            ahead = not reset and self._next_start is not None and self._next_start < cursor
            if cursor not in self._buffer and cursor != self._next_start and not ahead:
                self._restart(cursor)
            elif cursor not in self._buffer and not reset and self._produced_in_generation >= self.prefetch:
                self._starving = True  # past its start-up, the pipeline has nothing ready for this rank
            place()
            self._evict(readers)
            self._cond.wait_for(lambda: cursor in self._buffer or self._error is not None)
            if self._error is not None:
                if (data_error := data_source_error(self._error)) is not None:
                    raise data_error from None  # the data's own message, not Ray Data's wrapping of it
                raise RuntimeError(f"data pipeline failed: {self._error!r}") from self._error
            return self._buffer[cursor]

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

        def place():
            if reader == 0 and (not self._positions or self._positions.get(0) != cursor):
                self._asked.append(time.monotonic())
            self._positions[reader] = cursor

        batch = self._take(cursor, reset, readers, place)
        tokens, ids = batch.rows_for(dp_rank, dp_size)
        return tokens, ids, batch.end.as_list(), batch.bad_records

    def fetch(self, start: list[int], reset: bool, covered: list[int], position: list[int], readers: int):
        """The whole global batch at ``start``, for a relay (``DataRelay``): ``(tokens, ids, end,
        bad_records)``, or, when larger than Ray sends inline, a reference to it, put in the object
        store once however many relays ask. ``covered``: the readers the relay serves, every one at
        ``position`` or later (their slowest); batches before it may be dropped for them."""
        cursor, position = Cursor(*start), Cursor(*position)

        def place():
            if self._newest_asked is None or cursor > self._newest_asked:  # demand: each batch's first ask
                self._asked.append(time.monotonic())
                self._newest_asked = cursor
            self._place_covered(covered, position)

        batch = self._take(cursor, reset, readers, place)
        with self._cond:
            for key in [k for k in self._refs if k not in self._buffer]:
                del self._refs[key]
            value = (batch.tokens, batch.ids, batch.end.as_list(), batch.bad_records)
            if batch.tokens.nbytes + batch.ids.nbytes <= INLINE_BYTES:
                return value
            if cursor not in self._refs:
                import ray

                self._refs[cursor] = ray.put(value)
            return self._refs[cursor]

    def advance(self, covered: list[int], position: list[int], readers: int) -> None:
        """A relay's readers all moved to ``position`` or later (sent when their slowest moves on):
        batches before it may be dropped for them."""
        with self._cond:
            self.requests += 1
            self._place_covered(covered, Cursor(*position))
            self._evict(readers)

    def _place_covered(self, covered: list[int], position: Cursor) -> None:
        for reader in covered:
            self._positions[reader] = position

    def warm_start(self) -> None:
        """Start the stream at its beginning before any rank asks: a fresh run's pipeline then
        starts while the worker group does, not after."""
        with self._cond:
            if self._next_start is None:
                self._restart(Cursor())

    def demand(self) -> tuple[float | None, bool]:
        """(tokens/s the ranks consume, measured over the last batches reader 0 asked for, or None;
        whether the pipeline starved a rank since the last call)."""
        with self._cond:
            starving, self._starving = self._starving, False
            asked = list(self._asked)
        if len(asked) < 4 or asked[-1] <= asked[0]:
            return None, starving
        return (len(asked) - 1) / (asked[-1] - asked[0]) * self.global_batch_size * self.seq_len, starving

    def stats(self, rate: bool = False) -> dict:
        """Counters; with ``rate``, also ``tokens_per_s``: training tokens (rows x seq_len) the pipeline
        produced per second since the previous call with ``rate`` (one caller: rank 0's metrics)."""
        with self._cond:
            now, tokens = time.monotonic(), self.rows_produced * self.seq_len
            then, before = self._last_stats
            if rate:
                self._last_stats = (now, tokens)
            return {"buffered_batches": len(self._buffer), "replayable_batches": len(self._served),
                    "rows_produced": self.rows_produced, "pipeline_restarts": self.restarts,
                    "requests": self.requests,
                    "tokens_per_s": (tokens - before) / max(now - then, 1e-9),
                    "packers": self.pipeline.packers, "packer_tokens_per_s": self.pipeline.packer_tokens_per_s,
                    "shard_items_read": self.pipeline.items_admitted}


RELAY_PREFIX = "raytitan-relay-"  # relay actor names: RELAY_PREFIX + launch id + "-" + node id
RELAY_KEEP = 8  # global batches a relay holds per feed at most (its ranks need one or two)
FETCH_ATTEMPTS = 5  # a batch's object lost with a restarted feeder: fetched again this many times


def relay_name(launch: str, node_id: str) -> str:
    return f"{RELAY_PREFIX}{launch}-{node_id}"


@dataclass
class _RelayFeed:
    """What a relay knows of one feeder's stream: batches held, fetches under way, its ranks' cursors."""

    producer: object
    cache: OrderedDict = None  # cursor -> (tokens, ids, end, bad_records)
    fetching: dict = None  # cursor -> the task fetching it from the feeder
    positions: dict = None  # reader -> newest cursor it asked this relay for
    readers: int = 1
    reported: Cursor | None = None  # the slowest position the feeder was last told
    reset_at: Cursor | None = None  # a restart at this cursor was passed on to the feeder

    def __post_init__(self):
        self.cache, self.fetching, self.positions = OrderedDict(), {}, {}


class DataRelay:
    """Serves one node's ranks their slices of the feeders' global batches; an async Ray actor.

    One feeder answering every rank does work per step in proportion to the ranks (about 0.6-0.9 ms
    of CPU a request, answered one after another: docs/performance.md). A relay fetches each global
    batch once from its feeder, by cursor (``DataFeeder.fetch``), and cuts every rank's slice
    itself; the feeder answers one fetch and one position report per relay and step. Every batch
    still comes by cursor from the one stream, so the order, each rank's rows and resume on any
    data-parallel degree are the feeder's. A relay holds nothing that a restart could lose: a
    restarted one (Ray's ``max_restarts``) fetches what its ranks ask for again."""

    def __init__(self, producers: dict[str, str]):
        """``producers``: feed purpose -> the feeder actor's name (handles among a restartable actor's
        arguments would be kept in the object store, and a restart could find them gone)."""
        import ray

        self._feeds = {purpose: _RelayFeed(ray.get_actor(name)) for purpose, name in producers.items()}
        self.requests = 0

    def _feed(self, purpose: str) -> _RelayFeed:
        if purpose not in self._feeds:
            raise KeyError(f"this relay serves the feeds {sorted(self._feeds)}, not {purpose!r}")
        return self._feeds[purpose]

    async def get(self, purpose: str, start: list[int], dp_rank: int, dp_size: int, reset: bool = False,
                  reader: int | None = None, readers: int | None = None):
        """``DataFeeder.get``, answered from the batch this relay fetched once for all its ranks."""
        self.requests += 1
        feed = self._feed(purpose)
        reader = dp_rank if reader is None else reader
        feed.readers = dp_size if readers is None else readers
        cursor = Cursor(*start)
        forward_reset = False
        if reset:  # this rank (re)starts here: the cursors asked before belong to a group that is gone
            feed.positions.clear()
            for key in [k for k in feed.cache if k < cursor]:
                del feed.cache[key]
            forward_reset = feed.reset_at != cursor  # the feeder hears of a restart once per relay
        feed.positions[reader] = cursor
        batch = None if forward_reset else feed.cache.get(cursor)
        if batch is None:
            task = None if forward_reset else feed.fetching.get(cursor)
            if task is None:
                if forward_reset:
                    feed.reset_at = cursor
                task = feed.fetching[cursor] = asyncio.ensure_future(self._fetch(feed, cursor, forward_reset))
            batch = await asyncio.shield(task)
        self._trim(feed)
        tokens, ids, end, bad = batch
        per_rank = len(tokens) // dp_size
        rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return tokens[rows], ids[rows], end, bad

    async def _fetch(self, feed: _RelayFeed, cursor: Cursor, reset: bool):
        import ray

        try:
            for attempt in range(FETCH_ATTEMPTS):
                covered, slowest = sorted(feed.positions), min(feed.positions.values())
                feed.reported = slowest  # set now: a report sent while this fetch waits is newer
                try:
                    value = await feed.producer.fetch.remote(cursor.as_list(), reset, covered, slowest.as_list(),
                                                             feed.readers)
                    if isinstance(value, ray.ObjectRef):
                        value = await value
                except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
                    if attempt + 1 == FETCH_ATTEMPTS:
                        raise
                    continue  # the feeder that put it restarted: ask the new one
                except Exception as e:
                    if (data_error := data_source_error(e)) is not None:
                        raise data_error from None
                    raise
                if not reset and feed.reset_at is not None and cursor > feed.reset_at:
                    feed.reset_at = None  # moved on: a later restart at that cursor is a new one
                tokens, ids, end, bad = value
                feed.cache[cursor] = (tokens, ids, end, bad)
                return feed.cache[cursor]
        finally:
            if feed.fetching.get(cursor) is asyncio.current_task():
                del feed.fetching[cursor]

    def _trim(self, feed: _RelayFeed) -> None:
        """Drop the batches every rank here moved past; tell the feeder when the slowest moved."""
        slowest = min(feed.positions.values())
        for key in [k for k in feed.cache if k < slowest]:
            del feed.cache[key]
        while len(feed.cache) > RELAY_KEEP:
            feed.cache.popitem(last=False)
        if slowest != feed.reported:
            feed.reported = slowest
            feed.producer.advance.remote(sorted(feed.positions), slowest.as_list(), feed.readers)

    def stats(self) -> dict:
        return {"requests": self.requests,
                "held_batches": {purpose: len(feed.cache) for purpose, feed in self._feeds.items()}}


class Relays:
    """The driver's side: a ``DataRelay`` on every alive node for one launch, as the snapshot stores
    (``raytitan.ray.snapshots.SnapshotStores``) are placed; ``ensure`` again for nodes that join."""

    def __init__(self, launch: str, producers: dict[str, str], relay_class=DataRelay):
        """``producers``: feed purpose -> feeder actor name."""
        self.launch, self.producers, self.relay_class = launch, producers, relay_class
        self.actors: dict[str, object] = {}

    def ensure(self, node_ids: set[str]) -> None:
        """A relay on each of ``node_ids`` that has none yet."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for node in sorted(node_ids - set(self.actors)):
            # One request in flight per rank on the node; a restarted relay gets them again.
            self.actors[node] = ray.remote(self.relay_class).options(
                name=relay_name(self.launch, node), num_cpus=0, max_concurrency=4096, max_restarts=-1,
                max_task_retries=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(self.producers)

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()


def node_relay(launch: str | None):
    """This process's node's relay for ``launch``, or None (no relays, or none on this node: the
    rank then asks the feeder itself, as before relays)."""
    if launch is None:
        return None
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        return ray.get_actor(relay_name(launch, node))
    except ValueError:
        logger.warning("no data relay on this node (%s): this rank asks the data feeder directly", node[:8])
        return None


def ask(feeder, relay, purpose: str, start: Cursor, dp_rank: int, dp_size: int, reset: bool = False,
        reader: int | None = None, readers: int | None = None):
    """A rank's request for its rows of the batch at ``start``: to its node's relay, if it has one,
    else to the feeder. Returns the call's ObjectRef."""
    if relay is not None:
        return relay.get.remote(purpose, start.as_list(), dp_rank, dp_size, reset, reader, readers)
    return feeder.get.remote(start.as_list(), dp_rank, dp_size, reset, reader, readers)
