"""DCP storage as raw tensor bytes, for memory snapshots.

DCP's file-system writer frames every tensor with ``torch.save`` (a zip record per item), which
costs about as much CPU as the copy itself; a snapshot taken every step pays it every step. Here
each rank's items are laid end to end as their bytes in one file, the global metadata records
each item's file, offset and length (DCP's planner decides, as always, who holds what), and the
reader rebuilds each chunk from its bytes with the dtype and shape the metadata gives. Loading
reshards like any DCP checkpoint. No checksums: the bytes never leave host memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import pickle
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


class RawWriter(StorageWriter):
    """Keep one for a run's saves (one at a time): its buffer is reused, so a save copies into
    memory already mapped instead of faulting in fresh pages every time.

    ``background``: ``write_data`` packs this rank's items into the buffer (the only copy taken
    while training waits: no separate staging copy) and sends the buffer to storage from a thread
    of its own; ``uploaded`` completes when it is there. The commit must then wait for every
    rank's file (``CheckpointManager`` checks them)."""

    def __init__(self, path: str, background: bool = False):
        super().__init__()
        self.path = path
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.uploads = ThreadPoolExecutor(1, thread_name_prefix="raytitan-raw-upload") if background else None
        self.uploaded: concurrent.futures.Future | None = None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = str(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=f"__{rank}.raw") for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's items, end to end in one buffer sized up front: one copy of each."""
        name, parts = plan.storage_data, []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                parts.append(torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8))
            else:  # on its device: the copy into the buffer is the one copy to host memory
                parts.append(data.detach().contiguous().reshape(-1).view(torch.uint8))
        if self.uploaded is not None:
            concurrent.futures.wait([self.uploaded])  # the previous save's bytes have left the buffer
        size = sum(p.numel() for p in parts)
        if self.buffer.numel() != size:
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        out = self.buffer
        results, offset = [], 0
        for item, part in zip(plan.items, parts):
            out[offset:offset + part.numel()].copy_(part)
            results.append(WriteResult(index=item.index, size_in_bytes=part.numel(),
                                       storage_data=RawItem(name, offset, part.numel())))
            offset += part.numel()
        file = storage.join(self.path, name)
        if self.uploads is None:
            storage.write_bytes(file, out.numpy())  # copies it: the buffer is free again
        else:
            self.uploaded = self.uploads.submit(storage.write_bytes, file, out.numpy())
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        storage.write_bytes(storage.join(self.path, METADATA_FILE), pickle.dumps(metadata))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)


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
            for item in items:
                where = self.metadata.storage_data[item.storage_index]
                view = memoryview(data)[where.offset:where.offset + where.length]
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
