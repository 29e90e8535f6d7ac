import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from raytitan.checkpoint import COMMIT_MARKER, CheckpointError, CheckpointManager, ModelState, committed_steps


def manager(folder, model, keep=3):
    return CheckpointManager(str(folder), {"model": ModelState([model])}, interval=1, keep_latest_k=keep)


def test_save_load_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    manager(tmp_path, a).save(1)
    m = manager(tmp_path, b)
    m.load(m.resolve_load_step())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    model = torch.nn.Linear(8, 8)
    m = manager(tmp_path, model)
    m.save(1)

    def crashing_save(state, checkpoint_id, **kwargs):
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crashing_save)
    with pytest.raises(OSError):
        m.save(2)
    assert committed_steps(str(tmp_path)) == [1]
    assert m.resolve_load_step() == 1
    monkeypatch.undo()
    m.save(2)  # the debris of the crashed save is replaced
    assert committed_steps(str(tmp_path)) == [1, 2]


def test_retention_keeps_newest_k_and_the_seed(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(2, 2), keep=2)
    for step in (0, 1, 2, 3, 4):
        m.save(step, model_only=step == 0)
    assert committed_steps(str(tmp_path)) == [0, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["step-0", "step-3", "step-4"]


def test_load_step_must_be_committed(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(2, 2))
    m.save(5)
    assert m.resolve_load_step(5) == 5
    with pytest.raises(CheckpointError, match=r"load_step = 3.*committed steps: \[5\]"):
        m.resolve_load_step(3)


def test_corrupt_checkpoint_names_the_folder(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(8, 8))
    path = m.save(1)
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {path}.*{COMMIT_MARKER}"):
        manager(tmp_path, torch.nn.Linear(8, 8)).load(1)


def test_wrong_shape_is_an_error_not_a_partial_load(tmp_path):
    manager(tmp_path, torch.nn.Linear(8, 8)).save(1)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        manager(tmp_path, torch.nn.Linear(8, 4)).load(1)
