"""Memory snapshots (raytitan.ray.snapshots): real store actors on one local Ray instance, named as
if on three nodes A, B and C, and the checkpoint manager writing through them as workers do.


Drills (b), (c) and (d) of the two-tier design at the store level: a lost holder's part is read
from its replica, a part whose holders are both gone makes the snapshot incomplete and the
restore falls back to the disk checkpoint saying what it costs, and a snapshot killed before its
commit leaves the previous one the newest. Drill (a) runs through Ray Train in tests/test_elastic.py.
"""

import glob
import json
import mmap
import os
import threading

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # one local Ray instance for the module

import ray  # noqa: E402

from raytitan.components import storage  # noqa: E402
from raytitan.components.checkpoint.layout import committed_steps  # noqa: E402
from raytitan.components.checkpoint.manager import (  # noqa: E402
    CheckpointManager, ModelState, OptimizerState, SnapshotPlanner, first_nonfinite,
)
from raytitan.ray.snapshots import (  # noqa: E402
    SCHEME, SHARED_MEMORY, SLOTS, Part, Slots, SnapshotFileSystem, SnapshotStore, check_memory, is_rank_file,
    store_name,
)
from raytitan.trainer.loop import NonFiniteError, NonFiniteGuard, SnapshotFiniteness  # noqa: E402
from raytitan.trainer.worker import restore_snapshot  # noqa: E402
from tests.helpers import RaytitanLog  # noqa: E402

NODES = ("A", "B", "C")


def start_stores(launch: str) -> dict:
    """Three stores of ``launch``, all on this machine, named as nodes A, B and C (starting an actor
    takes about a second here: the tests share them where nothing is killed)."""
    return {node: ray.remote(SnapshotStore).options(name=store_name(launch, node), num_cpus=0).remote()
            for node in NODES}


@pytest.fixture(scope="module")
def shared_stores(ray_local):
    actors = start_stores("shared")
    yield "shared", actors
    for actor in actors.values():
        ray.kill(actor)
    storage.mount(SCHEME, None)


def as_rank_on(launch: str, node: str, folder: str, replicas: int = 1) -> str:
    """Mount the stores as a worker on ``node`` sees them; returns the snapshot folder."""
    storage.mount(SCHEME, pafs.PyFileSystem(SnapshotFileSystem(launch, replicas, node_id=node)))
    return f"{SCHEME}://{launch}/{folder}"


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


class Progress:
    """A state that is not a tensor (as the schedule, data cursor and step are): pickled anew by
    every snapshot, so a later one holds the newer value."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "seen": list(range(self.step))}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        assert state["seen"] == list(range(self.step))


def manager(folder: str, model, optimizer, progress: Progress | None = None, **kwargs) -> CheckpointManager:
    states = {"model": ModelState([model]), "optimizer": OptimizerState([model], [optimizer]),
              "train_state": progress or Progress()}
    raw_bytes = not folder.startswith("/")  # as the trainer writes snapshots (disk steps keep DCP's format)
    return CheckpointManager(folder, states, keep_latest_k=kwargs.pop("keep", 1), async_mode="async",
                             raw_bytes=raw_bytes, **kwargs)


def files_on(actors, node: str, folder: str) -> set[str]:
    return set(ray.get(actors[node].sizes.remote(folder)))


def assert_same(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_snapshot_round_trips_bit_identically_with_each_part_on_its_node_and_one_replica(shared_stores, monkeypatch):
    launch, actors = shared_stores
    folder = as_rank_on(launch, "B", "round-trip")
    model, optimizer = model_and_optimizer(0)
    progress = Progress(1)
    m = manager(folder, model, optimizer, progress)
    plans = []
    monkeypatch.setattr(dcp, "save", lambda *a, _save=dcp.save, **k: plans.append(1) or _save(*a, **k))
    m.save(1)
    m.wait()
    with torch.no_grad():  # the second snapshot copies the new values into the places the first one planned
        for p in model.parameters():
            p.mul_(-2.0)
    progress.step = 2
    m.save(2)
    m.close()
    assert plans == [1]  # planned once (DCP's collectives), then copied without DCP
    assert committed_steps(folder) == [2]  # the newest complete snapshot is kept; the older one is dropped

    held = {node: files_on(actors, node, f"{launch}/round-trip") for node in NODES}
    parts = {p for p in held["B"] if is_rank_file(p)}
    assert parts and parts <= held["C"] and not parts & held["A"]  # its node and the next one, not A
    assert all(p.endswith(("COMMITTED", ".metadata")) for p in held["A"])  # the small files are everywhere
    assert not any("step-1" in p for node in NODES for p in held[node])

    other, other_optimizer = model_and_optimizer(1)
    other_progress = Progress()
    restored = manager(folder, other, other_optimizer, other_progress)
    stores, inner = storage.handler(folder)
    stores.prefetch(inner, rank=0)  # as a restarted rank does while it builds its model
    stores._reading.result()
    assert sorted(p.split("/")[-1].split("-")[0] for p in stores._ahead) == [".metadata", "__0"]
    assert restored.load(restored.resolve_load_step()) == 2
    assert not stores._ahead  # the metadata and the part read ahead were the ones the load took
    assert_same(model, other)
    assert other_progress.step == 2
    assert torch.equal(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"],
                       other_optimizer.state[other_optimizer.param_groups[0]["params"][0]]["exp_avg"])


def test_a_snapshot_due_while_the_previous_one_is_still_being_sent_is_skipped_and_counted(shared_stores):
    launch, _ = shared_stores
    folder = as_rank_on(launch, "A", "skipped")
    model, optimizer = model_and_optimizer(0)
    sending, release = threading.Event(), threading.Event()

    def slow_link(step):  # on the upload thread: step 3's part is written, its seal held back
        if step == 3:
            sending.set()
            release.wait()

    m = manager(folder, model, optimizer, before_commit=slow_link)
    m.save(3)
    assert sending.wait(timeout=60)
    assert m.save(4) is None  # does not wait for step 3: skipped
    assert m.snapshots_skipped == 1
    assert committed_steps(folder) == []  # step 3 counts only once sealed
    release.set()
    m.wait()
    assert committed_steps(folder) == [3]
    m.save(5, blocking=True)
    m.close()
    assert committed_steps(folder) == [5] and m.snapshots_skipped == 1


def test_a_lost_node_s_part_is_read_from_its_replica_and_with_both_holders_gone_the_restore_falls_back_to_disk(
        ray_local, tmp_path):
    actors = start_stores("lost")
    model, optimizer = model_and_optimizer(0)
    disk = manager(str(tmp_path), model, optimizer)
    disk.save(10, blocking=True)
    memory = manager(as_rank_on("lost", "A", "run"), model, optimizer)
    memory.save(14, blocking=True)

    ray.kill(actors["A"])  # the rank's node is gone; its replica lives on B
    other, other_optimizer = model_and_optimizer(1)
    restored = manager(as_rank_on("lost", "C", "run"), other, other_optimizer)  # the rank restarted on C
    assert restore_snapshot(restored, disk_step=10) == 14
    assert_same(model, other)

    ray.kill(actors["B"])  # now both holders: step 14's marker survives on C, its data does not
    again, again_optimizer = model_and_optimizer(2)
    restored = manager(as_rank_on("lost", "C", "run"), again, again_optimizer)
    with RaytitanLog() as log:  # raytitan's logger does not propagate once a test set up its logging
        assert restore_snapshot(restored, disk_step=10) is None
    warned = "\n".join(log.messages("WARNING"))
    assert "is missing" in warned  # the incomplete snapshot, named
    assert "resuming from disk checkpoint step 10 costs 4 steps" in warned
    ray.kill(actors["C"])


def test_a_snapshot_killed_before_its_commit_leaves_the_previous_one_newest(shared_stores):
    launch, _ = shared_stores
    model, optimizer = model_and_optimizer(0)
    folder = as_rank_on(launch, "A", "killed")

    def die_before_commit(step):
        if step == 6:
            raise SystemExit("killed")  # where the fault injection's SIGKILL lands: parts written, no commit

    m = manager(folder, model, optimizer, before_commit=die_before_commit)
    m.save(5, blocking=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    m.save(6)
    with pytest.raises(SystemExit):
        m.wait()
    assert committed_steps(folder) == [5]

    other, other_optimizer = model_and_optimizer(1)
    restored = manager(folder, other, other_optimizer)
    assert restore_snapshot(restored, disk_step=None) == 5
    for name, value in other.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_memory_needed_is_reported_and_refused_above_the_share():
    gib = float(1 << 30)
    line = check_memory(1_000_000_000, replicas=1, node_memory={"a": 256 * gib, "b": 256 * gib}, share=0.5)
    # 12 GB per snapshot x 2 copies x 3 held (the newest complete one, two being written), over 2 nodes
    assert "11.18 GiB each, 2 copies, 3 held: 33.53 GiB per node over 2 node(s)" in line
    with pytest.raises(ValueError, match="memory_max_node_share = 0.05 of the smallest node's 64.0 GiB"):
        check_memory(1_000_000_000, replicas=1, node_memory={"a": 256 * gib, "b": 64 * gib}, share=0.05)
    one_node = check_memory(1_000_000, replicas=3, node_memory={"a": 8 * gib}, share=0.5)
    assert "1 copy" in one_node  # no other node to hold a replica


def test_a_store_counts_a_snapshot_once_every_rank_sealed_it_and_keeps_at_most_two_being_written():
    store = SnapshotStore()  # the actor's class, called in this process
    store.register_layout("run", "L", 2, b"metadata", {"model": "tiny"})
    for step in (1, 2, 3, 4):  # rank 0 is ahead; rank 1's parts have not come
        store.put_part(f"run/step-{step}/__0-L.raw", b"\x01" * 8, b"t", "run", "L", step)
        store.seal("run", "L", step, 0)
    assert sorted(store.sizes("run")) == ["run/step-3/__0-L.raw", "run/step-4/__0-L.raw"]  # no COMMITTED
    store.put_part("run/step-4/__1-L.raw", b"\x02" * 8, b"t", "run", "L", 4)
    assert "run/step-4/COMMITTED" not in store.sizes("run")  # written, not yet sealed
    store.seal("run", "L", 4, 1)
    assert sorted(store.sizes("run")) == ["run/step-4/.metadata", "run/step-4/COMMITTED", "run/step-4/__0-L.raw",
                                          "run/step-4/__1-L.raw"]
    marker = json.loads(store.get("run/step-4/COMMITTED"))
    assert (marker["step"], marker["world_size"], marker["format"], marker["model"]) == (4, 2, "raw", "tiny")
    assert store.get("run/step-4/.metadata") == b"metadata" and store.get("run/step-4/__1-L.raw") == b"\x02" * 8 + b"t"


def test_a_part_whose_weights_are_not_finite_is_never_sealed_and_every_rank_stops_at_the_next_snapshot(shared_stores):
    launch, actors = shared_stores
    folder = as_rank_on(launch, "A", "nonfinite")
    model, optimizer = model_and_optimizer(0)
    m = manager(folder, model, optimizer)
    finiteness = SnapshotFiniteness(torch.device("cpu"))  # as the trainer calls it before each snapshot
    finiteness.before_snapshot(m.nonfinite_step, NonFiniteGuard())
    m.save(1, blocking=True)
    spans = m._spans[1]
    assert len(spans) == 1 and len(spans[0][3]) == 4  # the model's 4 fp32 weights, next to each other: one sum
    with torch.no_grad():
        model[1].weight[2, 3] = float("nan")
    finiteness.before_snapshot(m.nonfinite_step, NonFiniteGuard())
    m.save(2)
    with RaytitanLog() as log:
        m.wait()
    assert m.nonfinite_step == 2
    assert "memory snapshot of step 2: this rank's part holds weights that are not finite (first: model.1.weight)" \
        in "\n".join(log.messages("ERROR"))
    assert committed_steps(folder) == [1]  # step 2 never completes, and nothing of it was written
    assert not any("step-2" in p for node in NODES for p in files_on(actors, node, f"{launch}/nonfinite"))
    finiteness.before_snapshot(m.nonfinite_step, NonFiniteGuard())  # step 3 posts it; the answer is read at step 4
    with pytest.raises(NonFiniteError, match="step 2: the weights are not finite after this step's update; not saved"):
        finiteness.before_snapshot(m.nonfinite_step, NonFiniteGuard())
    m.close()


def test_the_finiteness_check_sums_each_span_and_looks_item_by_item_only_when_a_sum_is_not_finite():
    buffer = torch.tensor([3e38, 3e38, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]).view(torch.uint8)
    spans = [(torch.float32, 0, 32, [(0, 16, "model.big"), (16, 32, "model.small")])]
    assert first_nonfinite(buffer, spans) is None  # the sum overflows; every element is finite
    buffer.view(torch.float32)[6] = float("-inf")
    assert first_nonfinite(buffer, spans) == "model.small"


@ray.remote(num_cpus=0)
class _Writer:
    """A rank's process, as far as the store sees it: it puts its part and hands the store the reference."""

    def write(self, store, path: str, data: bytes):
        import numpy as np

        ref = ray.put(np.frombuffer(data, dtype=np.uint8))
        return ray.get(store.put_part.remote(path, ref, b"tail", "writer-gone", "L", 1))


def test_a_store_keeps_a_part_in_the_object_store_without_a_copy_and_it_outlives_its_writer(shared_stores):
    launch, actors = shared_stores
    data = bytes(range(256)) * 4096  # 1 MiB
    kept = actors["B"].__ray_call__.remote
    before = ray.get(kept(lambda store: store.kept_in_object_store))  # other tests' parts
    writer = _Writer.remote()
    assert ray.get(writer.write.remote(actors["B"], "writer-gone/step-1/__0-L.raw", data)) == len(data) + 4
    assert ray.get(kept(lambda store: store.kept_in_object_store)) == before + len(data)  # as delivered, not copied
    ray.kill(writer)  # the rank's process dies, as the worker of a drill does: its part stays readable
    assert ray.get(actors["B"].get.remote("writer-gone/step-1/__0-L.raw")) == data + b"tail"
    ray.get(actors["B"].delete.remote("writer-gone"))
    assert ray.get(kept(lambda store: store.kept_in_object_store)) == before


def test_the_snapshot_planner_frames_each_distinct_plain_value_once_and_tells_equal_looking_values_apart():
    import io
    import math

    from torch.distributed.checkpoint.planner import WriteItemType

    class Item:  # the one field transform_object reads
        type = WriteItemType.BYTE_IO

    memo = {}
    planner = SnapshotPlanner(memo)
    values = [1, 1.0, True, 0.0, -0.0, float("nan"), (0.9, 0.95), (0.9, 0.95), "adamw", None, [1, 2]]
    loaded = [torch.load(io.BytesIO(planner.transform_object(Item(), v).getvalue()), weights_only=False) for v in values]
    for value, back in zip(values, loaded):
        assert type(back) is type(value) and (back == value or math.isnan(back)), value
    assert math.copysign(1.0, loaded[4]) == -1.0  # -0.0 is not 0.0's bytes
    assert len(memo) == 9  # the tuple once; the list (not a plain value) framed anew, not kept


def test_parts_beyond_the_object_store_share_are_copied_into_the_store_s_own_memory():
    store = SnapshotStore()
    store._object_store_room = 12  # OBJECT_STORE_SHARE of a (tiny) node's object store
    store.put_part("run/step-1/__0-L.raw", b"\x01" * 8, b"t", "run", "L", 1)
    store.put_part("run/step-1/__1-L.raw", b"\x02" * 8, b"t", "run", "L", 1)  # 16 bytes would not fit
    assert [type(store.files[f"run/step-1/__{r}-L.raw"]).__name__ for r in (0, 1)] == ["Part", "bytearray"]
    assert store.kept_in_object_store == 8
    assert store.get("run/step-1/__0-L.raw") == b"\x01" * 8 + b"t" and store.get("run/step-1/__1-L.raw") == b"\x02" * 8 + b"t"
    store.delete("run/step-1/__0-L.raw")
    assert store.kept_in_object_store == 0


def slot_files() -> list[str]:
    """Slot sets still named in /dev/shm: none once their ranks mapped them (nothing left behind)."""
    return glob.glob(os.path.join(SHARED_MEMORY, "raytitan-snapshot-*"))


def test_a_rank_writes_its_parts_into_slots_its_node_s_store_keeps_as_they_are(shared_stores, monkeypatch):
    launch, actors = shared_stores
    folder = as_rank_on(launch, "C", "slots", replicas=0)  # the part's one holder: the rank's own node
    puts, taken = [], []
    monkeypatch.setattr(ray, "put", lambda *a, _put=ray.put, **k: puts.append(1) or _put(*a, **k))
    monkeypatch.setattr(Slots, "take", lambda self, _take=Slots.take: taken.append(_take(self)) or taken[-1])
    model, optimizer = model_and_optimizer(0)
    progress = Progress()
    m = manager(folder, model, optimizer, progress)
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        progress.step = step
        m.save(step, blocking=True)
    m.close()
    assert puts == []  # no object in Ray's object store: the store keeps the slot the rank wrote
    assert len(taken) == 6 and len(set(taken)) > 1 and None not in taken  # one slot after another, never none free
    in_slots = ray.get(actors["C"].__ray_call__.remote(
        lambda store: sorted(p for p, part in store.files.items() if isinstance(part, Part) and part.slot)))
    assert [p for p in in_slots if "/slots/" in p] == [p for p in files_on(actors, "C", f"{launch}/slots")
                                                       if is_rank_file(p)]  # step 6's part, in its slot
    assert not slot_files()

    other, other_optimizer = model_and_optimizer(1)
    restored_progress = Progress()
    restored = manager(folder, other, other_optimizer, restored_progress)
    assert restore_snapshot(restored, disk_step=None) == 6
    assert_same(model, other)
    assert restored_progress.step == 6


@ray.remote(num_cpus=0)
class _SlotWriter:
    """A rank's process on node B, writing one part into its slots as a worker does."""

    def write(self, launch: str, path: str, data: bytes) -> list[int]:
        import numpy as np

        fs = SnapshotFileSystem(launch, 0, node_id="B")
        slots = fs.slots("slot-writer-gone#0", len(data))
        index = slots.take()
        slots.view(index)[:] = np.frombuffer(data, dtype=np.uint8)
        fs.write_part(path, slots.view(index), b"tail", "slot-writer-gone", "L", 1, (slots, index))
        return sorted(slots.free)


def test_a_part_in_a_slot_outlives_its_writer_and_the_slots_go_when_the_rank_opens_new_ones(shared_stores):
    launch, actors = shared_stores
    data = bytes(range(256)) * 64
    call = actors["B"].__ray_call__.remote
    before = ray.get(call(lambda store: len(store.slot_sets)))
    writer = _SlotWriter.remote()
    free = ray.get(writer.write.remote(launch, "slot-writer-gone/step-1/__0-L.raw", data))
    assert len(free) == SLOTS - 1  # the slot it wrote holds a kept part now
    ray.kill(writer)  # the rank's process dies: its part stays readable
    assert ray.get(actors["B"].get.remote("slot-writer-gone/step-1/__0-L.raw")) == data + b"tail"
    assert ray.get(call(lambda store: len(store.slot_sets))) == before + 1
    assert not slot_files()
    path = ray.get(actors["B"].open_slots.remote("slot-writer-gone#0", 64, SLOTS))  # the rank restarted
    assert slot_files() == [path]  # named until the rank maps it
    _map(path, 64)
    assert ray.get(call(lambda store: len(store.slot_sets))) == before + 2  # the old ones still hold the part
    ray.get(actors["B"].delete.remote("slot-writer-gone"))
    assert ray.get(call(lambda store: len(store.slot_sets))) == before + 1  # no kept part in them: let go
    assert not slot_files()


class _NoRoom(SnapshotStore):
    def open_slots(self, owner: str, size: int, count: int) -> str:
        raise OSError(28, "No space left on device")


def test_without_room_for_slots_the_parts_go_through_ray_s_object_store_with_a_warning(ray_local):
    store = ray.remote(_NoRoom).options(name=store_name("no-room", "A"), num_cpus=0).remote()
    model, optimizer = model_and_optimizer(0)
    m = manager(as_rank_on("no-room", "A", "run", replicas=0), model, optimizer)
    with RaytitanLog() as log:
        m.save(1, blocking=True)
    assert "no shared memory for this rank's snapshot parts on its node" in "\n".join(log.messages("WARNING"))
    assert m._raw_writer.slots is None
    other, other_optimizer = model_and_optimizer(1)
    restored = manager(as_rank_on("no-room", "A", "run", replicas=0), other, other_optimizer)
    assert restore_snapshot(restored, disk_step=None) == 1
    assert_same(model, other)
    ray.kill(store)


def test_on_one_node_a_part_and_its_seal_go_to_the_store_in_one_call(ray_local, monkeypatch):
    store = ray.remote(SnapshotStore).options(name=store_name("one-node", "A"), num_cpus=0).remote()
    calls = []
    ask = SnapshotFileSystem._ask
    monkeypatch.setattr(SnapshotFileSystem, "_ask", lambda self, method, *a, **k: calls.append(method) or ask(self, method, *a, **k))
    model, optimizer = model_and_optimizer(0)
    folder = as_rank_on("one-node", "A", "run")

    def die_before_seal(step):
        if step == 3:
            raise SystemExit("killed")  # where the fault injection's SIGKILL lands

    m = manager(folder, model, optimizer, before_commit=die_before_seal)
    m.save(1, blocking=True)
    calls.clear()
    m.save(2, blocking=True)
    assert calls == ["put_slot"]  # the part, in its slot, and its seal
    assert committed_steps(folder) == [2]
    m.save(3)
    with pytest.raises(SystemExit):
        m.wait()
    assert committed_steps(folder) == [2]  # killed before its one call: the previous one stays the newest
    ray.kill(store)


def _map(path: str, size: int) -> Slots:
    """A rank's side of ``open_slots``, in this process."""
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(fd, size * SLOTS)
    os.close(fd)
    os.unlink(path)
    return Slots(path, memory, size, SLOTS)


def test_a_store_never_hands_out_a_slot_it_keeps_and_lets_go_of_a_group_s_slots_after_the_next_group_s_snapshot():
    store = SnapshotStore()  # the actor's class, called in this process
    store.register_layout("run", "L", 2, b"metadata", {})
    size = 2 * mmap.PAGESIZE  # whole pages: a slot's memory can be given back
    ranks = [_map(store.open_slots(f"run#{r}", size, SLOTS), size) for r in (0, 1)]

    def write(rank: int, step: int, layout: str = "L", slots: Slots | None = None) -> None:
        slots = slots or ranks[rank]
        index = slots.take()
        assert index is not None
        slots.view(index)[:] = step
        slots.free = set(store.put_slot(f"run/step-{step}/__{rank}-{layout}.raw", slots.path, index, b"t", "run",
                                        layout, step))
        store.seal("run", layout, step, rank)

    write(0, 1)
    write(1, 1)
    for step in (2, 3, 4, 5):  # rank 1 lags: rank 0's slots hold step 1 (complete) and at most two newer ones
        write(0, step)
        kept = {part.slot[1] for part in store.files.values() if part.slot and part.slot[0] == ranks[0].path}
        assert len(kept) <= 3 and not kept & ranks[0].free
    assert store.get("run/step-1/__0-L.raw") == b"\x01" * size + b"t"  # the complete one, never written over
    write(1, 5)
    assert "run/step-5/COMMITTED" in store.sizes("run")

    store.register_layout("run", "M", 1, b"metadata", {})  # a new group of one rank
    new = _map(store.open_slots("run#0", 16, SLOTS), 16)
    assert len(store.slot_sets) == 3  # the old group's hold step 5, the newest complete snapshot
    old = store.slot_sets[ranks[0].path]
    assert ranks[0].free and all(bytes(ranks[0].view(i)) == b"\x00" * size for i in ranks[0].free)  # given back
    assert store.get("run/step-5/__0-L.raw") == b"\x05" * size + b"t"  # its kept part is not
    assert old.owner is None
    write(0, 6, "M", new)
    assert sorted(store.sizes("run")) == ["run/step-6/.metadata", "run/step-6/COMMITTED", "run/step-6/__0-M.raw"]
    assert list(store.slot_sets) == [new.path]  # the old group's slots: let go
    assert store.get("run/step-6/__0-M.raw") == b"\x06" * 16 + b"t"
    assert store.used() == 16 * SLOTS + 1


def test_a_set_its_rank_could_not_map_is_let_go_of_at_once():
    store = SnapshotStore()
    path = store.open_slots("run#0", 64, SLOTS)
    assert slot_files() == [path]
    store.close_slots(path)  # as the rank does when it cannot open or map the file
    assert not store.slot_sets and not slot_files()
