"""DCP storage as raw tensor bytes, for memory snapshots.

DCP's file-system writer frames every tensor with ``torch.save`` (a zip record per item), which
costs about as much CPU as the copy itself; a snapshot taken every step pays it every step. Here
each rank's items are laid end to end as their bytes in one file, the global metadata records
each item's file, offset and length (DCP's planner decides, as always, who holds what), and the
reader rebuilds each chunk from its bytes with the dtype and shape the metadata gives. Loading
reshards like any DCP checkpoint. No checksums: the bytes never leave host memory. The shapes do
not change between the snapshots of one worker group, so the plan is made once (``RawWriter``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import pickle
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from raytitan.components import storage

FORMAT = "raw"  # the commit marker's "format" for steps written here
METADATA_FILE = ".metadata"  # where DCP's own writer keeps it too: ``layout`` reads either


@dataclasses.dataclass(frozen=True)
class RawItem:
    """Where one stored item's bytes are (the fields ``layout.check_files`` reads)."""

    relative_path: str
    offset: int
    length: int


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


ALIGN = 16  # each tensor's offset in a part: a multiple of any element size, so the buffer views as its dtype


class RawWriter(StorageWriter):
    """Memory snapshots, planned once and copied many times.

    The first snapshot of a worker group goes through ``dcp.save`` (its planning collectives
    decide which rank writes which item, and name the group's layout), which keeps this rank's
    items with their offsets in a buffer of its own, and DCP's metadata on the coordinator. Every
    later snapshot with the same state keys skips DCP: ``pack`` copies the same items into the
    same places (one copy of each tensor, no collective) and ``send`` hands the part to a thread
    that writes it to its holders and then seals it (``SnapshotFileSystem``: one write per
    holder, one small seal per store). Items that are not tensors (the schedule, the data
    cursor, the step) are pickled anew each time and go after the tensors, with a table of
    where each one is (``tail``); the metadata marks them ``offset = -1``.

    ``slots_for(size)``: places shared with the store on this rank's node (``snapshots.Slots``),
    or None. With them, each part is packed into a free slot, which that store keeps as it is:
    one copy per snapshot, the same memory every time. On CUDA the tensors are first copied into
    a pinned buffer of the writer's own (``staged``), and from there into the slot by the
    sending thread. Without slots, the part is packed into that buffer and sent from it."""

    def __init__(self, path: str, slots_for: Callable[[int], object | None] | None = None):
        super().__init__()
        self.path = path
        self.buffer = torch.empty(0, dtype=torch.uint8)  # where the training thread packs (a slot, or the writer's own)
        self.slots_for, self.slots, self.slot = slots_for, None, -1  # ``snapshots.Slots``, and the one packed into
        self.staged = torch.cuda.is_available()  # pack into the writer's own (pinned) buffer even with slots
        self.targets: dict[int, dict[str, torch.Tensor]] = {}  # slot (-1: own buffer) -> key -> where its tensor goes
        self.uploads = ThreadPoolExecutor(1, thread_name_prefix="raytitan-raw-upload")
        self.uploaded: concurrent.futures.Future | None = None
        self.items: list = []  # this rank's write items, as the group's plan gave them
        self.offsets: dict[str, tuple[int, int]] = {}  # tensor fqn+offset key -> (offset, length) in the buffer
        self.sources: dict[str, torch.Tensor] = {}  # key -> the tensor the last full build found for it
        self.keys: frozenset[str] = frozenset()  # the flattened state keys the plan was made for
        self.name = ""  # this rank's part file in a step folder (names the layout)
        self.metadata: bytes | None = None  # the coordinator's, until it is registered with the stores
        self.tail = b""

    # ------------------------------------------------------------------ DCP's interface (the planned snapshot)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = str(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        layout = uuid.uuid4().hex[:12]  # this group's: its parts never take the name of another group's
        return [dataclasses.replace(plan, storage_data=f"__{rank}-{layout}.raw") for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Keep the plan (this rank's items and where each goes) and pack them."""
        self.name, self.items, self.offsets, offset = plan.storage_data, list(plan.items), {}, 0
        self.sources, self.targets = {}, {}
        for item in self.items:
            if item.type != WriteItemType.BYTE_IO:
                length = _nbytes(item)
                self.offsets[_key(item)] = (offset, length)
                offset += -(-length // ALIGN) * ALIGN
        if self.slots_for is not None and (self.slots is None or self.slots.size != offset):
            self.slots = self.slots_for(offset)
        if (self.slots is None or self.staged) and self.buffer.numel() != offset:
            self.buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self.keys = frozenset(planner.state_dict)  # DefaultSavePlanner's flattened state
        self.pack(planner)
        results = []
        for item in self.items:
            where = self.offsets.get(_key(item), (-1, 0))
            results.append(WriteResult(index=item.index, size_in_bytes=where[1],
                                       storage_data=RawItem(self.name, *where)))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        self.metadata = pickle.dumps(metadata)  # registered with the stores before this rank's first seal

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    # ------------------------------------------------------------------ every snapshot

    def planned_for(self, planner: SavePlanner, kept: frozenset[str] = frozenset()) -> bool:
        """Whether the kept plan fits this state (same keys, with ``kept``: see ``pack``): then
        ``pack`` may skip DCP."""
        return bool(self.name) and frozenset(planner.state_dict) | kept == self.keys

    def busy(self) -> bool:
        """The previous snapshot is still being sent (its part is still leaving the buffer), or
        every slot still holds a part the store keeps."""
        return (self.uploaded is not None and not self.uploaded.done()) or (self.slots is not None and not self.slots.free)

    def buffers(self) -> list[torch.Tensor]:
        """Every place a part may be packed into: the writer's own buffer and each slot."""
        own = [self.buffer] if self.slots is None or self.staged else []
        slots = [torch.from_numpy(self.slots.view(i)) for i in range(self.slots.count)] if self.slots else []
        return own + slots

    def _target(self, key: str, source: torch.Tensor) -> torch.Tensor:
        """Where ``source`` (the item ``key``) goes in this pack's buffer."""
        targets = self.targets.setdefault(-1 if self.staged else self.slot, {})
        target = targets.get(key)
        if target is None:
            offset, length = self.offsets[key]
            target = targets[key] = self.buffer[offset:offset + length].view(source.dtype).view(source.shape)
        return target

    def pack(self, planner: SavePlanner, kept: frozenset[str] = frozenset()) -> None:
        """This snapshot's items: the tensors copied into the buffer at their planned places (one
        copy of each, from its device), the other items pickled into ``tail`` (after the tensors,
        with a table of where each is). Tensors named in ``kept`` are copied from where the last
        pack found them (``planner`` lacks them: see ``manager.SnapshotSources``)."""
        if self.slots is not None:  # ``busy`` said there is a free one
            self.slot = self.slots.take()
            if not self.staged:
                self.buffer = torch.from_numpy(self.slots.view(self.slot))
        extra, table, copies = [], {}, []
        at = self.buffer.numel()
        for item in self.items:
            if item.index.fqn in kept:
                key = _key(item)
                copies.append((self._target(key, self.sources[key]), self.sources[key]))
                continue
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                value = data.getvalue()
                table[item.index.fqn] = (at, len(value))
                extra.append(value)
                at += len(value)
                continue
            offset, length = self.offsets[_key(item)]
            if data.numel() * data.element_size() != length:
                raise ValueError(f"{item.index.fqn}: {data.numel() * data.element_size()} bytes, but the snapshot "
                                 f"plan has {length}")
            self.sources[_key(item)] = data.detach()
            copies.append((self._target(_key(item), data), data.detach()))
        trailer = pickle.dumps(table)
        self.tail = b"".join(extra) + trailer + len(trailer).to_bytes(8, "little")
        # The copies run here, on the training thread. From the upload thread (hundreds of small
        # copies taking the GIL back and forth, and intra-op threads of their own) the training rate
        # on CPU fell to 0.51 of disk-only's in benchmarks/recovery.py.
        for target, source in copies:
            target.copy_(source)

    def send(self, step: int, deliver: Callable[[int, str, object, bytes, bytes | None, tuple | None], None]) -> None:
        """``deliver(step, part path, body, tail, metadata to register or None, (slots, slot) or
        None)`` on the upload thread, after copying a staged part into its slot."""
        metadata, self.metadata = self.metadata, None
        part, tail = storage.join(self.path, self.name), self.tail
        if self.slots is None:
            self.uploaded = self.uploads.submit(deliver, step, part, self.buffer.numpy(), tail, metadata, None)
            return
        where, body, staged = (self.slots, self.slot), self.slots.view(self.slot), self.buffer if self.staged else None

        def upload() -> None:
            if staged is not None:
                torch.from_numpy(body).copy_(staged)
            deliver(step, part, body, tail, metadata, where)

        self.uploaded = self.uploads.submit(upload)

    def close(self) -> None:
        self.uploads.shutdown()


def _key(item) -> str:
    return f"{item.index.fqn}@{tuple(item.index.offset or ())}"


def _nbytes(item) -> int:
    chunk = item.tensor_data.chunk
    return math.prod(chunk.sizes) * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()


def read_tail(data) -> dict[str, tuple[int, int]]:
    """A part's table of its non-tensor items: fqn -> (offset, length)."""
    size = int.from_bytes(bytes(data[-8:]), "little")
    return pickle.loads(bytes(data[-8 - size:-8]))


class RawReader(StorageReader):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.metadata: Metadata | None = None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = str(checkpoint_id)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return pickle.loads(storage.read_bytes(storage.join(self.path, METADATA_FILE)))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.metadata.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            data = bytearray(storage.read_bytes(storage.join(self.path, name)))  # writable: tensors view it
            table = None
            for item in items:
                where = self.metadata.storage_data[item.storage_index]
                offset, length = where.offset, where.length
                if offset < 0:  # packed after the tensors, where the part's own table says
                    table = table if table is not None else read_tail(data)
                    offset, length = table[item.storage_index.fqn]
                view = memoryview(data)[offset:offset + length]
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(view))
                    continue
                stored = self._chunk(item.storage_index, view)
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                    stored = stored.narrow(dim, start, length)
                target = planner.resolve_tensor(item).detach()
                target.copy_(stored)
                planner.commit_tensor(item, target)
        return _done(None)

    def _chunk(self, index: MetadataIndex, view: memoryview) -> torch.Tensor:
        """The stored chunk ``index`` names, as a tensor of its dtype and shape over ``view``."""
        meta = self.metadata.state_dict_metadata[index.fqn]
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
        flat = torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
        return flat.view(meta.properties.dtype).reshape(chunk.sizes)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True
