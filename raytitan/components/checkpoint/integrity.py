"""Checksums of a step's stored items, so that bytes damaged after a save (a failing disk, a torn
copy, a flipped bit on an object store) are found when they are read, instead of being trained on.

**Saving.** Every byte DCP writes into a data file is hashed (CRC-32) on its way out, in segments
cut at each ``tell()``: DCP asks the position before and after each item it writes (that is how it
records the item's offset and length in ``.metadata``), so every stored item is one segment (or
several whole ones). ``__R_I.distcp.checksums`` beside each data file lists ``[offset, length,
crc]`` per segment, written when the file is complete, before DCP's ``.metadata`` and the commit
marker; the marker records ``"checksums": "crc32"``. Nothing is read back, and the hashing runs in
the thread that writes: in the background for async saves. ``torch.save`` also computes a CRC-32
of every zip record it writes, which ``torch.load`` never checks; it costs as much as these
checksums, so it is switched off while a data file is written, in the thread that writes it (torch's
public ``set_crc32_options``, a per-thread setting; torch documents that such files load), and the checksums cost the save
almost nothing net.

**Loading.** Each stored item's bytes are checked as DCP reads them (``dcp_files.reader`` with a
``check``), just before they are deserialized: every rank checks only what it reads (locally the
check reads the item through a small buffer and DCP reads it again from the page cache; on
object stores both use the one ranged read), and a mismatch on one rank fails the load on every
rank (DCP gathers read errors), so all ranks fall back together. ``verify_step`` checks a whole
step offline (``checkpoints verify``).

CRC-32 finds every error burst up to 32 bits and any other damage but for a 2**-32 chance per
item; it is the fastest adequate stdlib hash here (3 GB/s against blake2b's 0.9), and guards
against accidents, not tampering. Steps saved before checksums existed load unchecked.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Any

import torch.serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import Metadata

from raytitan.components import storage
from raytitan.components.checkpoint import dcp_files
from raytitan.components.checkpoint.layout import COMMIT_MARKER, CheckpointError, read_commit_at, read_metadata

ALGORITHM = "crc32"
SUFFIX = ".checksums"  # beside each data file: __0_0.distcp.checksums
_CHUNK = 8 << 20  # checks read an item this much at a time


class ChecksumError(CheckpointError):
    """A stored item whose bytes are not those saved (or whose checksums are missing or damaged)."""


# --------------------------------------------------------------------------- saving

@contextmanager
def _without_torch_record_crc():
    """Skip torch.save's unchecked per-record CRC-32 while a data file is written. torch keeps the
    setting per thread, and DCP writes each file (stream and torch.save) from one thread: it is
    switched off and restored there, so other threads' saves keep theirs."""
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(saved)


class _HashingStream:
    """A data file being written, hashed in segments cut at every ``tell()`` (DCP's item bounds)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.segments: list[list[int]] = []
        self.seconds = 0.0
        self._start, self._crc, self._finished = raw.tell(), 0, False

    def write(self, data) -> int:
        n = self.raw.write(data)
        t0 = time.perf_counter()
        self._crc = zlib.crc32(data, self._crc)
        self.seconds += time.perf_counter() - t0
        return n

    def tell(self) -> int:
        position = self.raw.tell()
        if position > self._start:
            self.segments.append([self._start, position - self._start, self._crc])
        self._start, self._crc = position, 0
        return position

    def finish(self) -> None:
        """Close the last segment, in case no ``tell()`` followed it."""
        if not self._finished:
            self.tell()
            self._finished = True

    def close(self) -> None:
        self.finish()
        self.raw.close()

    def __getattr__(self, name: str) -> Any:  # flush, fileno (fsync), ...
        return getattr(self.raw, name)


class _HashingFileSystem:
    """DCP's file-system interface of a writer, writing each data file's checksums beside it."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.seconds = 0.0  # spent hashing, all files together (benchmarks, logs)
        self._lock = threading.Lock()  # DCP may write several files from threads

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode or not str(path).endswith(DEFAULT_SUFFIX):
            with self.inner.create_stream(path, mode) as stream:
                yield stream
            return
        with _without_torch_record_crc(), self.inner.create_stream(path, mode) as raw:
            stream = _HashingStream(raw)
            yield stream
            stream.finish()
        with self.inner.create_stream(f"{path}{SUFFIX}", "wb") as f:
            f.write(json.dumps({"algorithm": ALGORITHM, "segments": stream.segments}).encode())
        with self._lock:
            self.seconds += stream.seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def writer(path: str) -> FileSystemWriter:
    """DCP's writer for ``path`` (``dcp_files.writer``) that also writes checksums; its
    ``fs.seconds`` says how long this rank spent hashing."""
    w = dcp_files.writer(path)
    w.fs = _HashingFileSystem(w.fs)
    return w


def hashing_seconds(w: FileSystemWriter) -> float:
    return getattr(w.fs, "seconds", 0.0)


# --------------------------------------------------------------------------- checking


def _segments(step_path: str, relative_path: str) -> dict[int, tuple[int, int]]:
    """offset -> (length, crc) of one data file's segments; raises naming the sidecar file."""
    file = storage.join(step_path, relative_path + SUFFIX)
    try:
        saved = json.loads(storage.read_text(file))
        if saved.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {saved.get('algorithm')!r}, not {ALGORITHM}")
        return {int(o): (int(n), int(c)) for o, n, c in saved["segments"]}
    except FileNotFoundError:
        raise ChecksumError(f"{file} is missing: the checksums of {relative_path} are lost") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChecksumError(f"{file} is damaged ({type(e).__name__}: {e})") from None


def key_at(metadata: Metadata, relative_path: str, offset: int) -> str:
    """The DCP key (e.g. ``model.layers.0.attention.wq.weight``) stored at a file's offset."""
    for index, info in metadata.storage_data.items():
        if info.relative_path == relative_path and info.offset == offset:
            return index.fqn
    return "?"


class _Checker:
    """``dcp_files.reader``'s ``check``: compares each item's bytes with its saved checksums."""

    def __init__(self, step_path: str, metadata: Metadata | None = None):
        self.path, self.metadata = step_path, metadata
        self.files: dict[str, dict[int, tuple[int, int]]] = {}
        self.seconds = 0.0
        self._buffer = memoryview(bytearray(_CHUNK))  # reused: fresh memory per item costs more than the hash

    def __call__(self, sinfo: Any, stream: Any) -> None:
        t0 = time.perf_counter()
        if sinfo.relative_path not in self.files:
            self.files[sinfo.relative_path] = _segments(self.path, sinfo.relative_path)
        why = _region_mismatch(stream, self.files[sinfo.relative_path], sinfo.offset, sinfo.length, self._buffer)
        self.seconds += time.perf_counter() - t0
        if why:
            metadata = self.metadata or read_metadata(self.path)
            key = key_at(metadata, sinfo.relative_path, sinfo.offset)
            raise ChecksumError(f"'{key}' in {storage.join(self.path, sinfo.relative_path)} is damaged: {why}")


def has_checksums(marker: dict) -> bool:
    """Whether a step's commit marker says its items have checksums (steps saved before do not)."""
    algorithm = marker.get("checksums")
    if algorithm not in (None, ALGORITHM):
        raise CheckpointError(f"this step's checksums are {algorithm!r}, which this raytitan cannot check: "
                              "load it with the raytitan version that saved it")
    return algorithm == ALGORITHM


def reader(step_path: str, metadata: Metadata | None = None, marker: dict | None = None) -> FileSystemReader:
    """DCP's reader for a step, checking every item it reads against the step's checksums (a
    ``ChecksumError`` naming the key on a mismatch); a plain reader for steps without them."""
    if marker is None:
        marker = read_commit_at(step_path) if storage.isfile(storage.join(step_path, COMMIT_MARKER)) else {}
    if not has_checksums(marker):
        return dcp_files.reader(step_path)
    return dcp_files.reader(step_path, check=_Checker(step_path, metadata))


def checking_seconds(r: FileSystemReader) -> float:
    """How long a ``reader`` spent checking checksums (reading the items' bytes and hashing them)."""
    return getattr(getattr(r, "check", None), "seconds", 0.0)


def verify_step(step_path: str, metadata: Metadata, marker: dict) -> list[str] | None:
    """Check every stored item of a step against its checksums, reading each data file once
    (offline: ``checkpoints verify``). Returns one line per damaged item (key, file, bytes), or
    per data file whose checksums are lost; None when the step has no checksums."""
    if not has_checksums(marker):
        return None
    per_file: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in metadata.storage_data.items():
        per_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn))
    problems = []
    for name, items in sorted(per_file.items()):
        try:
            segments = _segments(step_path, name)
        except ChecksumError as e:
            problems.append(str(e))
            continue
        buffer = memoryview(bytearray(_CHUNK))
        with storage.open_binary(storage.join(step_path, name)) as f:
            for offset, length, key in sorted(items):
                f.seek(offset)
                why = _region_mismatch(f, segments, offset, length, buffer)
                if why:
                    problems.append(f"{name}: cannot read '{key}': {why}")
    return problems


def _region_mismatch(f: Any, segments: dict[int, tuple[int, int]], offset: int, length: int,
                     buffer: memoryview) -> str | None:
    """Why the ``length`` bytes stored at ``offset`` fail their checksums (None when they pass),
    read from ``f``'s position a buffer at a time (items can be GBs)."""
    position, end = offset, offset + length
    while position < end:
        segment = segments.get(position)
        if segment is None or position + segment[0] > end:
            return f"no checksum was saved for bytes {position}-{end}"
        crc, left = 0, segment[0]
        while left:
            n = f.readinto(buffer[:min(left, len(buffer))])
            if not n:
                return f"the file ends at byte {position + segment[0] - left}, inside this item"
            crc, left = zlib.crc32(buffer[:n], crc), left - n
        if crc != segment[1]:
            return f"bytes {position}-{position + segment[0]} differ from those saved (CRC-32)"
        position += segment[0]
    return None
