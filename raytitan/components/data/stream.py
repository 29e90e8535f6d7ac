"""The deterministic packed-sequence stream and its resumable position.

The stream is a pure function of (shard list, tokenizer, seq_len, seed):
  epoch e visits the shards in a seeded order; each shard's documents are tokenized as
  BOS text EOS, concatenated, and cut into non-overlapping windows of seq_len + 1 tokens
  (a shard's last partial window is dropped). Every window is identified by
  (epoch, shard, window). Optionally, windows are shuffled within seeded blocks of a shard.
  Global batch k is rows [k*G, (k+1)*G) of this order, and data-parallel rank d of D takes
  the d-th contiguous 1/D of it.

A ``Cursor`` (epoch, position in that epoch's shard order, position in that shard's output)
names the next window: it is all a checkpoint needs to resume, on any number of ranks.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import astuple, dataclass

import numpy as np

logger = logging.getLogger(__name__)

ID_COLUMNS = ("epoch", "shard", "window")


class DataSourceError(ValueError):
    """A dataset that cannot be read, or can never make a batch; the message names the key or file and what to do."""


@dataclass(frozen=True, order=True)
class Cursor:
    epoch: int = 0
    shard_pos: int = 0
    position: int = 0

    def as_list(self) -> list[int]:
        return list(astuple(self))


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard visiting order of one epoch: a seeded permutation, different every epoch."""
    order = list(range(num_shards))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are truncated (and counted)


@dataclass
class ShardStats:
    """Records of a shard, and those a reader could not use as they were (skipped records are never fatal)."""

    records: int = 0  # every record read, usable or not
    malformed: int = 0  # not JSON, not an object, no string text, invalid UTF-8
    empty: int = 0
    truncated: int = 0
    corrupt: int = 0  # the file itself broke off (bad gzip member, truncated file)
    corrupt_error: str = ""

    @property
    def total(self) -> int:
        return self.malformed + self.empty + self.truncated + self.corrupt

    @property
    def skipped(self) -> int:
        return self.malformed + self.empty

    def summary(self) -> str:
        return (f"{self.records} records, {self.skipped} skipped ({self.malformed} malformed, {self.empty} empty)"
                + (f", {self.truncated} truncated" if self.truncated else "")
                + (f", corrupt after the last good record ({self.corrupt_error})" if self.corrupt else ""))


# (shard, epoch) pairs whose skipped records this process already reported: a shard re-read in the
# same epoch (a resume, a validation pass) does not say it again.
_REPORTED: dict[tuple[str, int], None] = {}
_REPORTED_MAX = 100_000


def _report_once(path: str, epoch: int, stats: ShardStats) -> None:
    if not stats.total or (path, epoch) in _REPORTED:
        return
    if len(_REPORTED) >= _REPORTED_MAX:
        _REPORTED.pop(next(iter(_REPORTED)))
    _REPORTED[(path, epoch)] = None
    logger.warning("%s (epoch %d): %s; skipped records are counted in data/bad_records", path, epoch, stats.summary())


def _lines(stream, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    # read1 stops at a gzip member boundary, so records before a corrupt member still arrive.
    read = getattr(stream, "read1", stream.read)
    pending = b""
    while chunk := read(chunk_bytes):
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def _json_texts(stream, stats: ShardStats) -> Iterator[str | None]:
    for line in _lines(stream):
        if not line.strip():
            continue
        stats.records += 1
        try:
            text = json.loads(line).get("text")
        except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
            text = None
        if not isinstance(text, str):
            stats.malformed += 1
            continue
        yield text


def check_text_column(path: str, schema) -> None:
    """A columnar shard must have a string column ``text``: any other schema fails the whole file at once."""
    import pyarrow as pa

    if "text" not in schema.names:
        raise DataSourceError(f"{path}: no 'text' column (columns: {', '.join(schema.names) or 'none'}); "
                              "C4-format shards need a string column named 'text'")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataSourceError(f"{path}: column 'text' is {kind}, not string; C4-format shards need the document "
                              "text as a string column named 'text'")


def _parquet_texts(stream, stats: ShardStats, path: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(stream)
    except Exception as e:  # pyarrow raises ArrowInvalid (or OSError) for a file that is not parquet
        raise DataSourceError(f"{path}: cannot read it as parquet ({e}); replace or remove the file") from None
    check_text_column(path, shard.schema_arrow)
    for batch in shard.iter_batches(columns=["text"], batch_size=1024):
        stats.records += batch.num_rows
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                stats.malformed += 1
                continue
            yield text


def read_texts(path: str, stats: ShardStats, chunk_docs: int = 512, epoch: int | None = None) -> Iterator[list[str]]:
    """Texts of a C4-format shard (json lines, gzipped or not, or parquet), in file order.

    Unusable records are skipped or truncated and counted in ``stats``; a file that breaks
    off mid-way (corrupt gzip, truncated) yields what was readable before the break. With an
    ``epoch``, what was skipped is logged, once per shard and epoch in this process.
    """
    from raytitan.components.storage import open_binary

    chunk: list[str] = []
    with open_binary(path) as raw:
        if path.endswith(".parquet"):
            texts = _parquet_texts(raw, stats, path)
        else:
            texts = _json_texts(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw, stats)
        try:
            for text in texts:
                if not text.strip():
                    stats.empty += 1
                    continue
                if len(text) > MAX_DOCUMENT_CHARS:
                    text = text[:MAX_DOCUMENT_CHARS]
                    stats.truncated += 1
                chunk.append(text)
                if len(chunk) == chunk_docs:
                    yield chunk
                    chunk = []
        except (OSError, EOFError, zlib.error) as e:
            stats.corrupt += 1
            stats.corrupt_error = str(e)
    if chunk:
        yield chunk
    if epoch is not None:
        _report_once(path, epoch, stats)


def pack_shard(path: str, tokenizer, seq_len: int, stats: ShardStats | None = None,
               rows_per_chunk: int = 256, epoch: int | None = None) -> Iterator[np.ndarray]:
    """All windows [n, seq_len + 1] (int32) of one shard in order, a chunk at a time.

    The last chunk is held back until the file is fully read, so ``stats`` is final
    when it is yielded.
    """
    stats = stats if stats is not None else ShardStats()
    width = seq_len + 1
    buffer: list[int] = []
    ready: list[np.ndarray] = []
    have = 0
    for texts in read_texts(path, stats, epoch=epoch):
        for ids in tokenizer.encode_batch(texts):
            buffer.append(tokenizer.bos_id)
            buffer.extend(ids)
            buffer.append(tokenizer.eos_id)
        full = len(buffer) // width
        if full:
            ready.append(np.asarray(buffer[: full * width], dtype=np.int32).reshape(full, width))
            del buffer[: full * width]
            have += full
            while have > rows_per_chunk:
                stacked = np.concatenate(ready)
                yield stacked[:rows_per_chunk]
                ready, have = [stacked[rows_per_chunk:]], have - rows_per_chunk
    if have:
        yield np.concatenate(ready)


def _blocks(windows: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup window chunks into consecutive blocks of exactly ``size`` (the last may be short)."""
    pending: list[np.ndarray] = []
    have = 0
    for chunk in windows:
        pending.append(chunk)
        have += len(chunk)
        while have >= size:
            stacked = np.concatenate(pending)
            yield stacked[:size]
            pending, have = [stacked[size:]], have - size
    if have:
        yield np.concatenate(pending)


def shard_rows(path: str, shard: int, epoch: int, shard_pos: int, tokenizer, seq_len: int, skip: int,
               seed: int = 0, shuffle_block: int = 0, shards: list[str] | None = None) -> Iterator[dict]:
    """Batches of rows of one shard from output position ``skip`` on, with their ids.

    Columns: tokens, epoch, shard, shard_pos, window (the window's index in the shard: its
    identity), position (its index in this epoch's output order of the shard: the cursor),
    bad_records (records of this shard found unusable since the previous batch).
    With ``shuffle_block`` > 0, windows are permuted within consecutive blocks of that many,
    seeded by (seed, epoch, shard, block): order stays a pure function of the cursor.
    Given the whole shard list, a shard without a window checks that some shard has one
    (``require_windows``): an epoch without windows would make the stream loop forever.
    """
    stats = ShardStats()
    reported = 0
    block = shuffle_block or 256
    chunks = pack_shard(path, tokenizer, seq_len, stats, rows_per_chunk=block, epoch=epoch)
    start = 0
    for tokens in _blocks(chunks, block) if shuffle_block else chunks:
        n = len(tokens)
        window = np.arange(start, start + n, dtype=np.int64)
        if shuffle_block:
            order = np.random.default_rng([seed, epoch, shard, start // block]).permutation(n)
            tokens, window = tokens[order], window[order]
        position = np.arange(start, start + n, dtype=np.int64)
        start += n
        keep = position >= skip
        if not keep.any():
            continue
        bad = np.zeros(int(keep.sum()), dtype=np.int64)
        bad[0], reported = stats.total - reported, stats.total
        yield {
            "tokens": tokens[keep],
            "epoch": np.full(len(bad), epoch, dtype=np.int64),
            "shard": np.full(len(bad), shard, dtype=np.int64),
            "shard_pos": np.full(len(bad), shard_pos, dtype=np.int64),
            "window": window[keep],
            "position": position[keep],
            "bad_records": bad,
        }
    if start == 0 and shards is not None:
        require_windows(shards, tokenizer, seq_len)


def count_windows(path: str, tokenizer, seq_len: int, limit: int | None = None) -> tuple[int, int, ShardStats]:
    """(windows, tokens, stats) of one shard as the stream packs it; reading stops once ``limit`` windows are
    certain. Logs nothing: a check, not the stream."""
    stats, tokens = ShardStats(), 0
    for texts in read_texts(path, stats):
        tokens += sum(len(ids) + 2 for ids in tokenizer.encode_batch(texts))  # BOS text EOS
        if limit is not None and tokens // (seq_len + 1) >= limit:
            break
    return tokens // (seq_len + 1), tokens, stats


def describe_shards(counts: list[tuple[str, int, ShardStats]], limit: int = 5) -> str:
    """'path: N records, M skipped (...), T tokens; ...' for the first ``limit`` shards, and totals."""
    parts = [f"{path}: {stats.summary()}, {tokens} tokens" for path, tokens, stats in counts[:limit]]
    if len(counts) > limit:
        parts.append(f"and {len(counts) - limit} more")
    records = sum(s.records for _, _, s in counts)
    skipped = sum(s.skipped for _, _, s in counts)
    return f"{len(counts)} shard(s), {records} records, {skipped} skipped: " + "; ".join(parts)


# (shards, tokenizer, seq_len) this process has seen a window of: checked once, then trusted.
_HAS_WINDOWS: set[tuple] = set()


def require_windows(shards: list[str], tokenizer, seq_len: int) -> None:
    """Raise DataSourceError when no shard yields a window of seq_len + 1 tokens.

    Every epoch reads the same shards, so one with no window means all have none: the stream
    would then read epoch after epoch forever without a batch. Stops at the first window found.
    """
    key = (tuple(shards), tokenizer.name, getattr(tokenizer, "folder", None), seq_len)
    if key in _HAS_WINDOWS:
        return
    counts = []
    for path in shards:
        windows, tokens, stats = count_windows(path, tokenizer, seq_len, limit=1)
        if windows:
            _HAS_WINDOWS.add(key)
            return
        counts.append((path, tokens, stats))
    raise DataSourceError(
        f"no window of seq_len + 1 = {seq_len + 1} tokens in a whole epoch, so no batch can ever be made "
        f"({describe_shards(counts)}). Each shard is packed on its own and its last partial window dropped: "
        "use shards whose records have a string 'text' and hold more than seq_len + 1 tokens each, or a smaller "
        "seq_len")


def shard_plan(num_shards: int, seed: int, start: Cursor) -> Iterator[dict]:
    """The (epoch, shard_pos, shard, skip) work items from ``start`` on, forever."""
    for epoch in itertools.count(start.epoch):
        order = epoch_order(num_shards, seed, epoch)
        first = start.shard_pos if epoch == start.epoch else 0
        for pos in range(first, num_shards):
            skip = start.position if (epoch == start.epoch and pos == first) else 0
            yield {"epoch": epoch, "shard_pos": pos, "shard": order[pos], "skip": skip}


def local_rows(shards: list[str], tokenizer, seq_len: int, seed: int, start: Cursor,
               shuffle_block: int = 0) -> Iterator[dict]:
    """The stream computed in this process (torchrun runs, tests, the reference order)."""
    for item in shard_plan(len(shards), seed, start):
        yield from shard_rows(shards[item["shard"]], item["shard"], item["epoch"], item["shard_pos"],
                              tokenizer, seq_len, item["skip"], seed, shuffle_block, shards=shards)


@dataclass
class GlobalBatch:
    tokens: np.ndarray  # [G, seq_len + 1] int32
    ids: np.ndarray  # [G, 3] int64: (epoch, shard, window)
    start: Cursor
    end: Cursor  # cursor of the next global batch
    bad_records: int = 0  # unusable source records met while producing this batch

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
            end = Cursor(int(take["epoch"][last]), int(take["shard_pos"][last]), int(take["position"][last]) + 1)
            ids = np.stack([take[c] for c in ID_COLUMNS], axis=1)
            yield GlobalBatch(take["tokens"], ids, start, end, int(take["bad_records"].sum()))
            start = end
