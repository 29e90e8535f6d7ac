"""Memory snapshots: a run's recent state in host memory, on every node, replicated across nodes.

One ``SnapshotStore`` actor per node keeps files (path -> bytes) in its memory. The workers see
the stores as one filesystem (``SnapshotFileSystem``, mounted as ``raysnap://``), so a memory
snapshot is an ordinary raytitan checkpoint: the same ``CheckpointManager`` writes it through DCP
with its checksums and commit marker, and loads it resharded onto whatever layout the restarted
group has. Where the bytes go is this module's:

- a rank's data files (DCP's ``__R_I.distcp`` and their checksums) go to the store on its own
  node and to ``replicas`` stores on other nodes (the next ones in node-id order);
- everything else (DCP's metadata, the commit marker) is small and goes to every store;
- a read takes the file from the store on the reader's node if it has it, else from any other.

A file counts only once every copy is written (the write returns after the puts), and a step
only once its commit marker is, so a snapshot is complete when its marker is readable. If both
holders of some rank's part die, the step's files are missing and the checkpoint layer skips it
as incomplete. The stores belong to the launch (the driver), so they outlive every restart of
the worker group, and go with the launch: disk checkpoints are for durability.
"""

from __future__ import annotations

import io
import logging
import posixpath
import threading

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

SCHEME = "raysnap"  # worker paths: raysnap://<launch id>/...
STORE_PREFIX = "raytitan-snapshots-"  # store actor names: STORE_PREFIX + launch id + "-" + node id
QUERY_TIMEOUT_S = 30.0  # a store that does not answer a small query in this time counts as gone


class SnapshotStore:
    """One node's snapshot files, in this actor's memory."""

    def __init__(self):
        self.files: dict[str, bytearray] = {}
        self.free: dict[int, list[bytearray]] = {}  # dropped files' memory, by size: the next snapshot's

    def put(self, path: str, data) -> int:
        """Keep a copy of ``data`` (bytes, or a read-only array in Ray's object store), in the
        memory of a dropped file of the same size if there is one (already mapped: no page faults)."""
        view = memoryview(data).cast("B")
        spare = self.free.get(len(view))
        buffer = spare.pop() if spare else bytearray(len(view))
        buffer[:] = view
        self.files[path] = buffer
        return len(buffer)

    def get(self, path: str) -> bytes | None:
        data = self.files.get(path)
        return None if data is None else bytes(data)

    def sizes(self, prefix: str) -> dict[str, int]:
        """Files at or under ``prefix`` and their sizes."""
        below = prefix.rstrip("/") + "/"
        return {p: len(d) for p, d in self.files.items() if p == prefix or p.startswith(below) or not prefix}

    def delete(self, prefix: str) -> None:
        """Drop ``prefix`` and everything under it."""
        for path in list(self.sizes(prefix)):
            buffer = self.files.pop(path)
            spare = sum(len(b) for f in self.free.values() for b in f)
            if len(buffer) >= 1 << 20 and spare < sum(map(len, self.files.values())):  # at most one snapshot's worth
                self.free.setdefault(len(buffer), []).append(buffer)

    def move(self, src: str, dst: str) -> bool:
        if src not in self.files:
            return False
        self.files[dst] = self.files.pop(src)
        return True

    def used(self) -> int:
        """Bytes held: files and the spare memory kept for the next snapshot."""
        return sum(len(d) for d in self.files.values()) + sum(len(b) for f in self.free.values() for b in f)


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

    def holders(self, path: str) -> list[str]:
        """The nodes whose stores a new file at ``path`` goes to."""
        nodes = sorted(self.stores(refresh=True))
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

    def _read(self, path: str) -> bytes:
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
SNAPSHOTS_HELD = 2  # the newest complete one, and the one being written


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
