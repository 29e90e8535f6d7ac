"""Memory snapshots that skip rebuilding the model's and optimizer's state dicts
(``manager.SnapshotSources``): a snapshot that copies from where the last full build found the
tensors must hold exactly the bytes a full build of the same state gives, and anything that puts
a new tensor in the state must make the next snapshot build in full.

The part each snapshot sends is kept by a stand-in for the snapshot stores, in this process. The
tests run three ways: packed into the writer's own buffer (no store on the rank's node), into
slots shared with the store (one after another: a part must come out the same from any slot),
and staged in the writer's own buffer, then copied into a slot (as on CUDA).
"""

import copy
import hashlib
import mmap

import pyarrow.fs as pafs
import pytest
import torch

from raytitan.components import storage
from raytitan.components.checkpoint import raw
from raytitan.components.checkpoint.manager import CheckpointManager, ModelState, OptimizerState
from raytitan.ray.snapshots import SCHEME, SLOTS, SnapshotFileSystem, Slots
from tests.helpers import RaytitanLog, spawn


class KeepLastPart(SnapshotFileSystem):
    """The stores, as far as one rank's writes go: the last part sent, nothing else; with
    ``slots``, the rank's slots in this process's memory, all but the last part's free."""

    def __init__(self, slots: bool = False):
        super().__init__("local", 0, node_id="A")
        self.last: tuple[bytes, bytes] | None = None
        self.with_slots, self.slots_used = slots, []

    def stores(self, refresh: bool = False) -> dict:
        return {}  # none: the writes below stand in for them

    def slots(self, owner: str, size: int) -> Slots | None:
        return Slots("in this process", mmap.mmap(-1, size * SLOTS), size, SLOTS) if self.with_slots else None

    def register_layout(self, *args) -> None:
        pass

    def write_part(self, path, body, tail, folder, layout, step, slot=None) -> None:
        self.last = (bytes(body), bytes(tail))
        if slot is not None:
            slots, index = slot
            slots.free = set(range(slots.count)) - {index}
            self.slots_used.append(index)

    def seal(self, *args) -> None:
        pass


class Step:
    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def setup(model: torch.nn.Module, sink: KeepLastPart):
    """An optimizer with two groups and a schedule that moves every group's lr each step, and a
    snapshot manager writing to ``sink``."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    step = Step()
    storage.mount(SCHEME, pafs.PyFileSystem(sink))
    states = {"model": ModelState([model]), "optimizer": OptimizerState([model], [optimizer]), "train_state": step}
    manager = CheckpointManager(f"{SCHEME}://local/snapshots", states, keep_latest_k=1, async_mode="async",
                                raw_bytes=True, failed_write_ends_run=False)

    def train_and_snapshot() -> None:
        model(torch.randn(3, 8)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        step.step += 1
        manager.save(step.step)
        manager.wait()

    return optimizer, manager, train_and_snapshot


def rebuilt(manager: CheckpointManager, sink: KeepLastPart) -> tuple[bytes, bytes]:
    """The part a full build of the current state sends (the reference)."""
    manager._sources.fingerprint = None
    manager.save(manager.states["train_state"].step)
    manager.wait()
    return sink.last


@pytest.fixture(params=["own buffer", "slots", "staged, then slots"])
def sink(request, monkeypatch):
    if request.param == "staged, then slots":
        init = raw.RawWriter.__init__

        def staged(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.staged = True  # as on CUDA, in ordinary memory

        monkeypatch.setattr(raw.RawWriter, "__init__", staged)
    sink = KeepLastPart(slots=request.param != "own buffer")
    yield sink
    storage.mount(SCHEME, None)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def test_snapshots_after_the_first_reuse_its_build_and_hold_the_bytes_a_full_build_gives(sink):
    _, manager, train_and_snapshot = setup(tiny_model(), sink)
    parts = []
    for _ in range(4):
        train_and_snapshot()
        parts.append(sink.last)
    assert manager.snapshots_built == 1  # the first snapshot only
    if sink.with_slots:
        assert len(set(sink.slots_used)) > 1  # packed into one slot after another
    assert len({hashlib.sha256(body).digest() for body, _ in parts}) == 4  # each holds its own step's weights
    assert len({tail for _, tail in parts}) == 4  # and its own lr and step
    assert sink.last == rebuilt(manager, sink)


def test_a_new_tensor_in_the_state_makes_the_next_snapshot_build_in_full(sink):
    model = tiny_model()
    optimizer, manager, train_and_snapshot = setup(model, sink)
    train_and_snapshot()
    train_and_snapshot()
    assert manager.snapshots_built == 1

    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone()  # the same parameter, on new storage
    train_and_snapshot()
    assert manager.snapshots_built == 2
    assert sink.last == rebuilt(manager, sink)

    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new moment tensors
    train_and_snapshot()
    assert manager.snapshots_built == 4  # (the reference above built once)
    assert sink.last == rebuilt(manager, sink)


def test_hyperparameters_that_do_not_match_the_state_dict_make_every_snapshot_build_in_full(sink, monkeypatch):
    plain = OptimizerState.plain_state_dict
    monkeypatch.setattr(OptimizerState, "plain_state_dict",
                        lambda self: {k: v for k, v in plain(self).items() if not k.endswith(".eps")})
    _, manager, train_and_snapshot = setup(tiny_model(), sink)
    with RaytitanLog() as log:
        for _ in range(3):
            train_and_snapshot()
    assert manager.snapshots_built == 3
    assert len([m for m in log.messages("WARNING") if "do not match its state dict" in m]) == 1  # once a run
    assert sink.last == rebuilt(manager, sink)


def _sharded_snapshots(rank: int, world: int) -> dict:
    """FSDP2 over the ranks (DTensor weights and moments): the kept build against a full one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sink = KeepLastPart()
    _, manager, train_and_snapshot = setup(model, sink)
    for _ in range(3):
        train_and_snapshot()
    built = manager.snapshots_built
    kept = sink.last
    return {"built": built, "same": kept == rebuilt(manager, sink), "bytes": len(kept[0])}


@pytest.mark.slow
def test_sharded_weights_and_moments_are_kept_across_snapshots_too(tmp_path):
    ranks = spawn(_sharded_snapshots, 2, str(tmp_path))
    assert [r["built"] for r in ranks] == [1, 1]
    assert all(r["same"] for r in ranks)
    whole = sum(p.numel() for p in tiny_model().parameters()) * 12  # weights and two moments, fp32
    assert sum(r["bytes"] for r in ranks) >= whole  # each rank its own shard (step counts on top)
