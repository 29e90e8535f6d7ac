"""Memory snapshots: a run's recent state in host memory, on every node, replicated across nodes.

One ``SnapshotStore`` actor per node keeps files (path -> bytes) in its memory. The workers see
the stores as one filesystem (``SnapshotFileSystem``, mounted as ``raysnap://``), so a memory
snapshot loads like an ordinary raytitan checkpoint: DCP reads it resharded onto whatever layout
the restarted group has. Writing is by parts (``raw.RawWriter``):

- a rank's part goes to the store on its own node and to ``replicas`` stores on other nodes (the
  next ones in node-id order): ``write_part``, one call per holder. The rank packs it into one of
  its slots, shared memory its node's store mapped too (``open_slots``), which that store keeps as
  it is; the other holders get it through Ray's object store, put once, and keep it where Ray
  delivered it, in their node's object store, while there is room (``Part``);
- once every holder has it, the rank seals it: a small call to every store;
- a group's DCP metadata is the same for all its snapshots: its rank 0 registers it with every
  store once (``register_layout``).

A store counts a snapshot complete when every rank of its group sealed its part; it then shows
the step's ``.metadata`` and commit marker (``COMMITTED``) as files, and drops older snapshots.
No rank waits for another, and no rank 0 polls: completeness is decided where the seals arrive.
A read takes the file from the store on the reader's node if it has it, else from any other. If
both holders of some rank's part die, the step's part is missing and the checkpoint layer skips
it as incomplete. The stores belong to the launch (the driver), so they outlive every restart of
the worker group, and go with the launch: disk checkpoints are for durability.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import mmap
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

SCHEME = "raysnap"  # worker paths: raysnap://<launch id>/...
STORE_PREFIX = "raytitan-snapshots-"  # store actor names: STORE_PREFIX + launch id + "-" + node id
QUERY_TIMEOUT_S = 30.0  # a store that does not answer a small query in this time counts as gone
PENDING_KEPT = 2  # snapshots newer than the newest complete one a store keeps (being written; older ones dropped)
# Parts a store keeps as delivered take at most this share of its node's object store; beyond it
# they are copied into the store's own memory (as all were before), so the snapshots never crowd
# out the object store the data pipeline needs, and the driver's memory check stays the bound.
OBJECT_STORE_SHARE = 0.5
# Where a store makes the slots a rank on its node writes its parts into (``SnapshotStore.open_slots``).
SHARED_MEMORY = "/dev/shm"
# Slots per rank: the newest complete part, ``PENDING_KEPT`` newer ones being sealed, and the one being written.
SLOTS = 2 + PENDING_KEPT


class Part:
    """A rank's part as a store holds it: its packed tensors (``body``), not copied, then the small
    rest (``tail``). The body is in the slot its rank wrote it to (``slot``), or where Ray
    delivered it, read-only in the node's object store. Either stays after the process that wrote
    it is gone (the store maps the slot; its reference keeps the object); dropping the part frees
    the slot or the object. Parts in the object store are kept so while they take at most
    ``OBJECT_STORE_SHARE`` of it."""

    __slots__ = ("body", "tail", "slot")

    def __init__(self, body, tail: bytes, slot: tuple[str, int] | None = None):
        self.body, self.tail = memoryview(body).cast("B"), bytes(tail)
        self.slot = slot  # (slot set, index) when the body is in a rank's slot (``SnapshotStore.open_slots``)

    def __len__(self) -> int:
        return len(self.body) + len(self.tail)

    def __bytes__(self) -> bytes:
        return b"".join((self.body, self.tail))


class SlotSet:
    """One rank's slots, as its node's store keeps them (``SnapshotStore.open_slots``): ``count``
    places of ``size`` bytes in shared memory that the rank maps too. The rank writes a part into
    a slot the store said is free; the store keeps it there, without a copy, until it drops it."""

    __slots__ = ("memory", "size", "count", "owner", "layout")

    def __init__(self, memory: mmap.mmap, size: int, count: int, owner: str):
        self.memory, self.size, self.count = memory, size, count
        self.owner: str | None = owner  # the writing rank (folder and rank); None once another set took its place
        self.layout: tuple[str, str] | None = None  # (folder, layout) of its parts, from the first one


class SnapshotStore:
    """One node's snapshot files, in this actor's memory (parts: in the slots their ranks wrote
    them to, or in the node's object store while there is room, see ``Part``), and what it knows of
    which snapshots are complete (see ``seal``)."""

    def __init__(self):
        self.files: dict[str, bytearray | Part] = {}
        self.free: dict[int, list[bytearray]] = {}  # dropped files' memory, by size: the next snapshot's
        self.lock = threading.Lock()  # calls run on the actor's threads
        # folder -> layout id -> (world size, DCP metadata, commit facts, arrival order)
        self.layouts: dict[str, dict[str, tuple[int, bytes, dict, int]]] = {}
        self.sealed: dict[tuple[str, str, int], dict[int, float]] = {}  # (folder, layout, step) -> rank -> time
        self.parts: dict[str, tuple[str, str, int]] = {}  # part file -> (folder, layout, step)
        self.arrivals = 0
        self.kept_in_object_store = 0  # bytes of the parts held as ``Part`` in the object store
        self.slot_sets: dict[str, SlotSet] = {}  # by the file they were made as (``open_slots``)
        self.retired: set[tuple[str, str]] = set()  # (folder, layout) of groups whose snapshots all went
        self._object_store_room: float | None = None  # OBJECT_STORE_SHARE of the node's object store

    def _keep(self, path: str, data) -> int:
        """Keep a copy of ``data`` (bytes, or a read-only array in Ray's object store), in the
        memory of a dropped file of the same size if there is one (already mapped: no page faults)."""
        view = memoryview(data).cast("B")
        spare = self.free.get(len(view))
        buffer = spare.pop() if spare else bytearray(len(view))
        buffer[:] = view
        self.files[path] = buffer
        return len(buffer)

    def put(self, path: str, data) -> int:
        with self.lock:
            return self._keep(path, data)

    # ------------------------------------------------------------------ snapshots, part by part

    def register_layout(self, folder: str, layout: str, world: int, metadata: bytes, facts: dict) -> None:
        """A worker group's snapshot layout (sent by its rank 0 at its first snapshot): DCP's
        metadata, the same for every snapshot of the group, and the facts its commit marker holds."""
        with self.lock:
            self.arrivals += 1
            self.layouts.setdefault(folder, {})[layout] = (world, bytes(metadata), dict(facts), self.arrivals)
            self._retire(folder)

    def put_part(self, path: str, body, tail: bytes, folder: str, layout: str, step: int) -> int:
        """One rank's part of a snapshot: its packed tensors (``body``, an array in Ray's object
        store) then ``tail`` (the rest). Kept as delivered, without a copy, while the parts so kept
        fit in ``OBJECT_STORE_SHARE`` of the node's object store; else copied into this actor's memory."""
        with self.lock:
            view = memoryview(body).cast("B")
            if self.kept_in_object_store + len(view) <= self._room():
                part = Part(view, tail)
                self.kept_in_object_store += len(part.body)
            else:
                size = len(view) + len(tail)
                spare = self.free.get(size)
                part = spare.pop() if spare else bytearray(size)
                part[:len(view)] = view
                part[len(view):] = tail
            self.files[path] = part
            self.parts[path] = (folder, layout, step)
            return len(part)

    def open_slots(self, owner: str, size: int, count: int) -> str:
        """Shared memory for ``count`` parts of ``size`` bytes, which the rank ``owner`` (its folder
        and rank) on this node writes its parts into (``put_slot``): a part then costs its writer one
        copy and no new object in Ray's object store, whose fresh pages cost more than the copy. The
        room is taken now, so ``/dev/shm`` being too small is an ``OSError`` here, never a fault at
        a later write. Returns the file, which the rank maps and removes (the memory stays until
        both let go of it); a set opened before by the same ``owner`` goes once none of its slots
        holds a kept part."""
        path = os.path.join(SHARED_MEMORY, f"raytitan-snapshot-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size * count)
            memory = mmap.mmap(fd, size * count)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        with self.lock:
            for old in self.slot_sets.values():
                if old.owner == owner:
                    old.owner = None
                    self._give_back_free(old)
            self.slot_sets[path] = SlotSet(memory, size, count, owner)
            self._release_slots()
        return path

    def close_slots(self, path: str) -> None:
        """The rank could not map the set ``open_slots`` made (it sends its parts through the object
        store instead): let go of it now, file and all."""
        with self.lock:
            if path in self.slot_sets:
                self.slot_sets[path].owner = None
                self._release_slots()

    def _give_back_free(self, held: SlotSet) -> None:
        """Return the memory of the slots of ``held`` (a set another took the place of) that hold
        no kept part: its last parts stay readable while they are kept, the rest is freed now."""
        taken = {part.slot[1] for part in self.files.values() if isinstance(part, Part) and part.slot
                 and self.slot_sets.get(part.slot[0]) is held}
        page = mmap.PAGESIZE
        for index in set(range(held.count)) - taken:
            start, end = -(-index * held.size // page) * page, (index + 1) * held.size // page * page
            if end > start:
                held.memory.madvise(mmap.MADV_REMOVE, start, end - start)

    def put_slot(self, path: str, slots: str, index: int, tail: bytes, folder: str, layout: str, step: int,
                 seal: int | None = None) -> list[int]:
        """One rank's part of a snapshot, which the rank wrote into slot ``index`` of its ``slots``
        (``open_slots``), then ``tail`` (the rest): kept where it is, without a copy; ``seal``: that
        rank's seal of it too (``seal``), where this store is its only holder and the only store.
        Returns the slots the rank may write next: those no kept part is in."""
        with self.lock:
            held = self.slot_sets[slots]
            held.layout = (folder, layout)
            start = index * held.size
            self.files[path] = Part(memoryview(held.memory)[start:start + held.size], tail, (slots, index))
            self.parts[path] = (folder, layout, step)
            if seal is not None:
                self.sealed.setdefault((folder, layout, step), {})[seal] = time.time()
            self._retire(folder)
            taken = {part.slot[1] for part in self.files.values()
                     if isinstance(part, Part) and part.slot and part.slot[0] == slots}
            return [i for i in range(held.count) if i not in taken]

    def _release_slots(self) -> None:
        """Let go of the slot sets no kept part is in whose rank has another set or whose group's
        snapshots all went (the memory goes once the rank lets go too)."""
        used = {part.slot[0] for part in self.files.values() if isinstance(part, Part) and part.slot}
        for path, held in list(self.slot_sets.items()):
            if path not in used and (held.owner is None or held.layout in self.retired):
                del self.slot_sets[path]
                try:
                    os.unlink(path)  # its rank removes it once mapped; not if it died before
                except FileNotFoundError:
                    pass

    def _room(self) -> float:
        """Bytes of parts this store may keep in its node's object store (0 outside Ray)."""
        if self._object_store_room is None:
            size = 0.0
            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
                size = next((n.get("Resources", {}).get("object_store_memory", 0.0) for n in ray.nodes()
                             if n.get("NodeID") == node), 0.0)
            self._object_store_room = OBJECT_STORE_SHARE * size
        return self._object_store_room

    def seal(self, folder: str, layout: str, step: int, rank: int) -> None:
        """Rank ``rank``'s part of ``step`` is in place on all its holders (they answered its writer)."""
        with self.lock:
            self.sealed.setdefault((folder, layout, step), {})[rank] = time.time()
            self._retire(folder)

    def _complete(self, folder: str) -> list[tuple[int, int, str]]:
        """(step, layout arrival, layout) of every snapshot in ``folder`` that every rank sealed."""
        layouts = self.layouts.get(folder, {})
        return sorted((step, layouts[layout][3], layout) for (f, layout, step), ranks in self.sealed.items()
                      if f == folder and layout in layouts and len(ranks) == layouts[layout][0])

    def _retire(self, folder: str) -> None:
        """Once a snapshot is complete, everything older goes (and the same step of other groups);
        newer ones still being written stay, the oldest dropped beyond ``PENDING_KEPT``."""
        complete = self._complete(folder)
        newest = complete[-1] if complete else None
        keys = {key[1:] for key in self.sealed if key[0] == folder} | {(l, s) for f, l, s in self.parts.values() if f == folder}
        gone = {(l, s) for l, s in keys if newest and (s, self.layouts[folder].get(l, (0, b"", {}, 0))[3]) < newest[:2]}
        pending = sorted(s for l, s in keys - gone if not newest or s > newest[0])
        gone |= {(l, s) for l, s in keys - gone if s in pending[:-PENDING_KEPT]}
        for layout, step in gone:
            self.sealed.pop((folder, layout, step), None)
        for path in [p for p, (f, l, s) in self.parts.items() if f == folder and (l, s) in gone]:
            del self.parts[path]
            self._drop(path)
        used = {l for f, l, s in self.parts.values() if f == folder} | {k[1] for k in self.sealed if k[0] == folder}
        layouts = self.layouts.get(folder, {})
        latest = max(layouts, key=lambda l: layouts[l][3], default=None)
        for layout in [l for l in layouts if l not in used and l != latest]:
            del layouts[layout]
            self.retired.add((folder, layout))
        self._release_slots()

    def _virtual(self, prefix: str) -> dict[str, bytes]:
        """The step files a complete snapshot implies, where this store knows it is complete:
        ``step-N/.metadata`` (its group's layout) and ``step-N/COMMITTED``."""
        files = {}
        for folder, layouts in self.layouts.items():
            done: dict[int, tuple[int, str]] = {}
            for step, arrival, layout in self._complete(folder):
                done[step] = max(done.get(step, (0, "")), (arrival, layout))
            for step, (_, layout) in done.items():
                world, metadata, facts, _ = layouts[layout]
                base = f"{folder}/step-{step}"
                if not _under(base, prefix) and not _under(prefix, base):
                    continue
                marker = {"step": step, "world_size": world, "time": max(self.sealed[(folder, layout, step)].values()),
                          "model_only": False, "format": "raw", "layout": layout, **facts}
                files[f"{base}/.metadata"] = metadata
                files[f"{base}/COMMITTED"] = json.dumps(marker).encode()
        return {p: d for p, d in files.items() if _under(p, prefix)}

    # ------------------------------------------------------------------ files

    def get(self, path: str) -> bytes | None:
        with self.lock:
            data = self.files.get(path)
            if data is None:
                return self._virtual(path).get(path)
            return bytes(data)

    def sizes(self, prefix: str) -> dict[str, int]:
        """Files at or under ``prefix`` and their sizes."""
        with self.lock:
            found = {p: len(d) for p, d in self.files.items() if _under(p, prefix)}
            found.update({p: len(d) for p, d in self._virtual(prefix).items()})
            return found

    def delete(self, prefix: str) -> None:
        """Drop ``prefix`` and everything under it."""
        with self.lock:
            for path in [p for p in self.files if _under(p, prefix)]:
                self.parts.pop(path, None)
                self._drop(path)
            self._release_slots()

    def _drop(self, path: str) -> None:
        buffer = self.files.pop(path)
        if isinstance(buffer, Part):  # its object leaves the object store with the last reference
            if not buffer.slot:
                self.kept_in_object_store -= len(buffer.body)
            return
        spare = sum(len(b) for f in self.free.values() for b in f)
        if len(buffer) >= 1 << 20 and spare < sum(map(len, self.files.values())):  # at most one snapshot's worth
            self.free.setdefault(len(buffer), []).append(buffer)

    def move(self, src: str, dst: str) -> bool:
        with self.lock:
            if src not in self.files:
                return False
            self.files[dst] = self.files.pop(src)
            return True

    def used(self) -> int:
        """Bytes held: files (parts in the object store among them), the slot sets, and the spare
        memory kept for the next snapshot."""
        with self.lock:
            files = sum(len(d) if not (isinstance(d, Part) and d.slot) else len(d.tail) for d in self.files.values())
            return files + sum(len(b) for f in self.free.values() for b in f) \
                + sum(held.size * held.count for held in self.slot_sets.values())


class Slots:
    """A rank's slots (``SnapshotFileSystem.slots``): where it writes its parts, in memory the store
    on its node maps too. ``free``: the slots the store said hold no part it keeps, as of the
    rank's last part (``put_slot`` answers); only the rank writes into them, so they stay free
    until it does."""

    def __init__(self, path: str, memory: mmap.mmap, size: int, count: int):
        self.path, self.memory, self.size, self.count = path, memory, size, count
        self.array = np.frombuffer(memory, dtype=np.uint8)
        self.free = set(range(count))

    def take(self) -> int | None:
        """A free slot to write the next part into (no longer free), or None."""
        if not self.free:
            return None
        index = min(self.free)
        self.free.discard(index)
        return index

    def view(self, index: int) -> np.ndarray:
        return self.array[index * self.size:(index + 1) * self.size]


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def store_name(launch: str, node_id: str) -> str:
    return f"{STORE_PREFIX}{launch}-{node_id}"


class SnapshotStores:
    """The driver's side: a store on every alive node, for one launch."""

    def __init__(self, launch: str):
        self.launch = launch
        self.actors: dict[str, ray.actor.ActorHandle] = {}

    def ensure(self, node_ids: set[str]) -> None:
        """A store on each of ``node_ids`` that has none yet (nodes that joined)."""
        for node in sorted(node_ids - set(self.actors)):
            self.actors[node] = ray.remote(SnapshotStore).options(
                name=store_name(self.launch, node), num_cpus=0, max_restarts=0, max_concurrency=16,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote()

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()


class SnapshotFileSystem(pafs.FileSystemHandler):
    """The stores of one launch as a pyarrow filesystem (see the module docstring)."""

    def __init__(self, launch: str, replicas: int, node_id: str | None = None):
        self.launch, self.replicas = launch, replicas
        self.node_id = node_id or ray.get_runtime_context().get_node_id()
        self._stores: dict[str, ray.actor.ActorHandle] | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._ahead: dict[str, bytes] = {}  # files read ahead (``prefetch``), each handed out once
        self._reading: concurrent.futures.Future | None = None

    # ------------------------------------------------------------------ the stores

    def stores(self, refresh: bool = False) -> dict[str, ray.actor.ActorHandle]:
        """node id -> store, for every store of this launch Ray knows by name."""
        with self._lock:
            if self._stores is None or refresh:
                prefix = store_name(self.launch, "")
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith(prefix))
                self._stores = {}
                for name in names:
                    try:
                        self._stores[name.removeprefix(prefix)] = ray.get_actor(name)
                    except ValueError:  # gone between the listing and the lookup
                        pass
            return dict(self._stores)

    def holders(self, path: str, refresh: bool = True) -> list[str]:
        """The nodes whose stores a new file at ``path`` goes to (``refresh``: ask Ray which
        stores there are now, a lookup by name each; else the ones found last time)."""
        nodes = sorted(self.stores(refresh=refresh))
        if not is_rank_file(path):
            return nodes
        if self.node_id not in nodes:
            self._warn_once("local", f"no snapshot store on this worker's node {self.node_id[:8]}: its snapshot "
                            "parts are kept on other nodes only")
            start = 0
            count = self.replicas
        else:
            start = nodes.index(self.node_id)
            count = 1 + self.replicas
        if count > len(nodes):
            self._warn_once("replicas", f"checkpoint.memory_replicas = {self.replicas} but the cluster has "
                            f"{len(nodes)} node(s) with a snapshot store: each part is kept on {len(nodes)} node(s)")
        return [nodes[(start + i) % len(nodes)] for i in range(min(max(count, 1), len(nodes)))]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _ask(self, method: str, *args, nodes: list[str] | None = None) -> dict[str, object]:
        """Call ``method`` on the stores (all, or ``nodes``); node -> answer, for those that answer."""
        stores = self.stores()
        calls = {node: getattr(stores[node], method).remote(*args) for node in (nodes or stores) if node in stores}
        answers = {}
        for node, ref in calls.items():
            try:
                answers[node] = ray.get(ref, timeout=QUERY_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                self._warn_once(f"gone-{node}", f"the snapshot store on node {node[:8]} is gone: its copies are lost")
        return answers

    def put(self, path: str, data) -> None:
        """Write ``data`` (bytes or a uint8 array) to its holders: into Ray's object store once,
        from where each holder copies it."""
        nodes = self.holders(path)
        ref = ray.put(np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data)
        written = self._ask("put", path, ref, nodes=nodes)
        if not written:
            raise OSError(f"no snapshot store took {path} (nodes {', '.join(n[:8] for n in nodes)} are gone)")
        if len(written) < len(nodes):  # a holder died while writing: the step must not count as replicated
            raise OSError(f"{path}: {len(nodes) - len(written)} of its {len(nodes)} snapshot stores are gone")

    # ------------------------------------------------------------------ snapshots, part by part

    def register_layout(self, folder: str, layout: str, world: int, metadata: bytes, facts: dict) -> None:
        """A group's snapshot layout, to every store (rank 0, once per worker group)."""
        if not self._ask("register_layout", folder, layout, world, metadata, facts):
            raise OSError("no snapshot store is left")

    def slots(self, owner: str, size: int) -> "Slots | None":
        """``SLOTS`` places of ``size`` bytes for the parts of the rank ``owner`` (its folder and
        rank), in shared memory with the store on this node (``SnapshotStore.open_slots``); None
        where there is no store on this node or no room in ``/dev/shm`` (the parts then go through
        Ray's object store, as to every other holder), with a warning."""
        store = self.stores().get(self.node_id)
        if store is None or size <= 0:
            return None
        path = None
        try:
            path = ray.get(store.open_slots.remote(owner, size, SLOTS), timeout=QUERY_TIMEOUT_S)
            fd = os.open(path, os.O_RDWR)
            try:
                memory = mmap.mmap(fd, size * SLOTS)
            finally:
                os.close(fd)
                os.unlink(path)  # the store and this rank hold it now; gone with the last of them
        except (OSError, ray.exceptions.RayError) as e:
            if path is not None:
                store.close_slots.remote(path)
            self._warn_once("slots", f"no shared memory for this rank's snapshot parts on its node ({e}); they go "
                            "through Ray's object store (a new object, and its fresh pages, per snapshot)")
            return None
        return Slots(path, memory, size, SLOTS)

    def write_part(self, path: str, body, tail: bytes, folder: str, layout: str, step: int,
                   slot: "tuple[Slots, int] | None" = None) -> None:
        """One rank's part to its holders; returns once every holder has it. ``slot``: the part
        is in that slot of this rank's ``slots``, which the store on this node keeps as it is; the
        other holders get it through Ray's object store: put once, where each keeps it while
        there is room (a replica's node gets its own copy from Ray). The holders are the ones
        found at the last write, found again only if one of them is gone."""
        kept_here = False
        for refresh in (False, True):
            nodes = self.holders(path, refresh=refresh)
            written = {}
            if slot is not None and self.node_id in nodes:
                nodes.remove(self.node_id)
                if not kept_here:
                    self._put_slot(path, slot, tail, folder, layout, step)
                    kept_here = True
            if nodes:
                ref = ray.put(body)
                written = self._ask("put_part", path, ref, tail, folder, layout, step, nodes=nodes)
            if len(written) == len(nodes):
                return
        if not written:
            raise OSError(f"no snapshot store took {path} (nodes {', '.join(n[:8] for n in nodes)} are gone)")
        raise OSError(f"{path}: {len(nodes) - len(written)} of its {len(nodes)} snapshot stores are gone")

    def _put_slot(self, path: str, slot: "tuple[Slots, int]", tail: bytes, folder: str, layout: str, step: int,
                  seal: int | None = None) -> None:
        """The part in ``slot`` to the store on this node (``SnapshotStore.put_slot``), which answers
        with the slots free now."""
        slots, index = slot
        free = self._ask("put_slot", path, slots.path, index, tail, folder, layout, step, seal, nodes=[self.node_id])
        if self.node_id not in free:
            raise OSError(f"{path}: the snapshot store on this node {self.node_id[:8]} is gone")
        slots.free = set(free[self.node_id])

    def write_and_seal(self, path: str, body, tail: bytes, folder: str, layout: str, step: int, rank: int,
                       slot: "tuple[Slots, int] | None" = None, before_seal: Callable[[int], None] | None = None) -> None:
        """``rank``'s part of ``step`` to its holders (``write_part``), then its seal to every store
        (``seal``), with ``before_seal(step)`` in between (fault injection). Where the part is in a
        slot and this node's store is the only store (one node), one call does both."""
        if slot is not None and list(self.stores()) == [self.node_id] and self.holders(path, refresh=False) == [self.node_id]:
            if before_seal:
                before_seal(step)
            self._put_slot(path, slot, tail, folder, layout, step, seal=rank)
            return
        self.write_part(path, body, tail, folder, layout, step, slot)
        if before_seal:
            before_seal(step)
        self.seal(folder, layout, step, rank)

    def seal(self, folder: str, layout: str, step: int, rank: int) -> None:
        """Tell every store that ``rank``'s part of ``step`` is on all its holders."""
        if not self._ask("seal", folder, layout, step, rank):
            raise OSError("no snapshot store is left")

    def _sizes(self, prefix: str) -> dict[str, int]:
        merged: dict[str, int] = {}
        for sizes in self._ask("sizes", prefix).values():
            merged.update(sizes)
        return merged

    # ------------------------------------------------------------------ pyarrow's interface

    def get_type_name(self) -> str:
        return "raytitan-snapshots"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other) -> bool:
        return isinstance(other, SnapshotFileSystem) and other.launch == self.launch

    def _info(self, path: str, files: dict[str, int]) -> pafs.FileInfo:
        if path in files:
            return pafs.FileInfo(path, pafs.FileType.File, size=files[path])
        below = path.rstrip("/") + "/"
        if any(p.startswith(below) for p in files):
            return pafs.FileInfo(path, pafs.FileType.Directory)
        return pafs.FileInfo(path, pafs.FileType.NotFound)

    def get_file_info(self, paths):
        return [self._info(p, self._sizes(p)) for p in paths]

    def get_file_info_selector(self, selector):
        base = selector.base_dir.rstrip("/")
        files = self._sizes(base)
        if not files and not selector.allow_not_found:
            raise FileNotFoundError(base)
        found: dict[str, pafs.FileInfo] = {}
        for path, size in files.items():
            rest = path[len(base) + 1:].split("/")
            for depth in range(1, len(rest) + 1 if selector.recursive else 2):
                sub = posixpath.join(base, *rest[:depth])
                if sub not in found:
                    found[sub] = pafs.FileInfo(sub, pafs.FileType.File, size=size) if depth == len(rest) \
                        else pafs.FileInfo(sub, pafs.FileType.Directory)
        return list(found.values())

    def create_dir(self, path, recursive):
        pass  # folders exist as the prefixes of their files

    def delete_dir(self, path):
        self._ask("delete", path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._ask("delete", path)

    def delete_root_dir_contents(self):
        self._ask("delete", "")

    def delete_file(self, path):
        self._ask("delete", path)

    def move(self, src, dest):
        if not any(self._ask("move", src, dest).values()):
            raise FileNotFoundError(src)

    def copy_file(self, src, dest):
        self.put(dest, self._read(src))

    def prefetch(self, folder: str, rank: int) -> None:
        """Read the newest complete snapshot's metadata and this rank's own part (where the
        group's size did not change, all it needs) in a thread, while the restarted rank builds
        its model; a later read of those files takes them from here."""

        def read() -> None:
            files = self._sizes(folder)
            steps = [int(m.group(1)) for p in files if (m := re.search(r"/step-(\d+)/COMMITTED$", p))]
            if not steps:
                return
            base = f"{folder.rstrip('/')}/step-{max(steps)}/"
            for path in files:
                name = path[len(base):] if path.startswith(base) else None
                if name == ".metadata" or (name and name.startswith(f"__{rank}-") and is_rank_file(name)):
                    try:
                        self._ahead[path] = self._fetch(path)
                    except FileNotFoundError:
                        pass

        self._reading = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raytitan-snapshot-read") \
            .submit(read)

    def drop_prefetched(self) -> None:
        """Free what ``prefetch`` read and nothing took (the group resumed from elsewhere)."""
        if self._reading is not None:
            self._reading.result()
            self._reading = None
        self._ahead.clear()

    def _read(self, path: str) -> bytes:
        if self._reading is not None:
            try:
                self._reading.result()
            except (OSError, ray.exceptions.RayError) as e:  # only a head start: the read below says what is wrong
                logger.info("reading the snapshot ahead failed: %s", e)
            self._reading = None
        data = self._ahead.pop(path, None)
        return data if data is not None else self._fetch(path)

    def _fetch(self, path: str) -> bytes:
        stores = self.stores()
        order = sorted(stores, key=lambda node: node != self.node_id)  # this node's store first
        for node in order:
            data = self._ask("get", path, nodes=[node]).get(node)
            if data is not None:
                return data
        raise FileNotFoundError(f"{SCHEME}://{path}: no snapshot store holds it")

    def open_input_stream(self, path):
        return pa.BufferReader(self._read(path))

    def open_input_file(self, path):
        return pa.BufferReader(self._read(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Upload(self, path), mode="w")

    def write_whole(self, path: str, data) -> None:
        """A whole file at once (``storage.write_bytes``): no stream, no copy before the put."""
        self.put(path, data)

    def open_append_stream(self, path, metadata):
        raise OSError(f"{SCHEME}:// files cannot be appended to")


class _Upload(io.BytesIO):
    """A file being written: its bytes go to the stores when it is closed."""

    def __init__(self, fs: SnapshotFileSystem, path: str):
        super().__init__()
        self.fs, self.path = fs, path

    def close(self) -> None:
        if not self.closed:
            self.fs.put(self.path, self.getvalue())
        super().close()


def is_rank_file(path: str) -> bool:
    """A file one rank wrote (its part of the state): kept on its node and its replicas only."""
    name = posixpath.basename(path)
    return name.startswith("__") and (".distcp" in name or name.endswith(".raw"))


def mount(launch: str, replicas: int) -> str:
    """Serve this launch's stores as ``raysnap://`` in this worker; returns the snapshot folder."""
    from raytitan.components import storage

    storage.mount(SCHEME, pafs.PyFileSystem(SnapshotFileSystem(launch, replicas)))
    return f"{SCHEME}://{launch}/snapshots"


# What a snapshot holds per parameter: fp32 weights and Adam's two fp32 moments (the rest of the
# state, schedule and data cursor, is a few bytes).
BYTES_PER_PARAMETER = 12
SNAPSHOTS_HELD = 1 + PENDING_KEPT  # the newest complete one, and the newer ones being written


def check_memory(n_params: int, replicas: int, node_memory: dict[str, float], share: float) -> str:
    """The host memory memory snapshots need per node, against ``share`` of the smallest node's
    memory (Ray's ``memory`` resource); a ``ValueError`` with the numbers when it does not fit,
    else a line saying what they take."""
    nodes = max(len(node_memory), 1)
    copies = 1 + min(replicas, nodes - 1)
    snapshot = n_params * BYTES_PER_PARAMETER
    per_node = snapshot * copies * SNAPSHOTS_HELD / nodes  # parts spread evenly over the nodes
    smallest = min(node_memory.values(), default=0.0)
    gib = 1 << 30
    line = (f"memory snapshots: {snapshot / gib:.2f} GiB each, {copies} cop{'y' if copies == 1 else 'ies'}, "
            f"{SNAPSHOTS_HELD} held: {per_node / gib:.2f} GiB per node over {nodes} node(s)")
    if smallest and per_node > share * smallest:
        raise ValueError(f"{line}, more than checkpoint.memory_max_node_share = {share} of the smallest node's "
                         f"{smallest / gib:.1f} GiB: lower checkpoint.memory_replicas, raise memory_max_node_share, "
                         "add nodes, or set checkpoint.memory_interval = 0 (disk checkpoints only)")
    return f"{line} ({per_node / smallest:.1%} of the smallest node's memory)" if smallest else line
