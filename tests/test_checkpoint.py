import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from raytitan.components.checkpoint.layout import (

    COMMIT_MARKER, CheckpointError, committed_steps, final_export, read_metadata,

)

from raytitan.components.checkpoint.manager import CheckpointManager, ModelState, OptimizerState


def manager(folder, model, keep=3, **kwargs):
    return CheckpointManager(str(folder), {"model": ModelState([model])}, keep_latest_k=keep, **kwargs)


def trained(seed=0):
    """A small model and an Adam optimizer with state (one step taken)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def full_manager(folder, model, optimizer, **kwargs):
    states = {"model": ModelState([model]), "optimizer": OptimizerState([model], [optimizer])}
    return CheckpointManager(str(folder), states, keep_latest_k=0, **kwargs)


def assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_save_load_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    manager(tmp_path, a).save(1)
    m = manager(tmp_path, b)
    m.load(m.resolve_load_step())
    assert_same_weights(a, b)


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


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    # A launch earlier in the session stops raytitan's logger from propagating to the root.
    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)
    m = manager(tmp_path, torch.nn.Linear(8, 8))
    m.save(1)
    shard = os.path.join(m.save(2), "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="raytitan.components.checkpoint"):
        assert m.resolve_load_step() == 1
    assert f"skipping damaged checkpoint {tmp_path}/step-2" in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match=f"{shard} is truncated: 10 bytes, but '.*' ends at byte"):
        m.load(2)  # asked for explicitly: an error, never a partial load
    with pytest.raises(CheckpointError, match="truncated"):
        m.resolve_load_step(2)


def test_missing_shard_names_the_file(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(8, 8))
    os.remove(os.path.join(m.save(1), "__0_0.distcp"))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is missing \(it holds 'model\..*'"):
        m.load(1)
    with pytest.raises(CheckpointError, match="every committed checkpoint .* is damaged"):
        m.resolve_load_step()


def test_corrupt_bytes_name_the_folder_and_how_to_find_the_file(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(8, 8))
    path = m.save(1)
    shard = os.path.join(path, "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "wb") as f:
        f.write(b"\0" * size)  # right length, garbage inside: found only while reading
    with pytest.raises(CheckpointError, match=f"'model.weight' in {shard} is damaged: bytes .* differ .*checkpoints "
                                              f"verify {path}"):
        manager(tmp_path, torch.nn.Linear(8, 8)).load(1)
    marker = os.path.join(path, COMMIT_MARKER)
    with open(marker) as f:
        old_format = {k: v for k, v in json.load(f).items() if k != "checksums"}
    with open(marker, "w") as f:
        json.dump(old_format, f)  # saved before checksums: found by the deserializer
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {path}.*checkpoints verify {path}.*{COMMIT_MARKER}"):
        manager(tmp_path, torch.nn.Linear(8, 8)).load(1)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    manager(tmp_path, torch.nn.Linear(8, 8)).save(1)
    with pytest.raises(CheckpointError, match=r"'model.weight' has shape \[8, 8\] but this model's is \[4, 8\]"):
        manager(tmp_path, torch.nn.Linear(8, 4)).load(1)


def test_checkpoint_of_a_bigger_model_is_rejected(tmp_path):
    manager(tmp_path, torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))).save(1)
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match=r"2 model weights this model lacks \(first: 'model.1.bias'\)"):
        manager(tmp_path, smaller, model_keys=set(smaller.state_dict())).load(1)


def test_exclude_from_loading_restores_weights_but_not_the_optimizer(tmp_path):
    model, optimizer = trained()
    full_manager(tmp_path, model, optimizer).save(1)
    fresh_model, _ = trained(seed=1)
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters(), lr=0.1)
    full_manager(tmp_path, fresh_model, fresh_optimizer, exclude_from_loading=["optimizer"]).load(1)
    assert_same_weights(model, fresh_model)
    assert fresh_optimizer.state_dict()["state"] == {}
    fresh_model(torch.randn(2, 8)).sum().backward()
    fresh_optimizer.step()  # training continues from the loaded weights with a new optimizer
    assert len(fresh_optimizer.state_dict()["state"]) == 4


def test_resume_keeps_this_runs_lr_and_hyperparameters_and_restores_the_moments(tmp_path):
    """DCP loads the lr schedule before the optimizer (key order): the optimizer's load must not
    put the saved lr back over this run's schedule, nor the saved weight decay over a changed config."""
    from raytitan.components.optimizer import LRSchedulerState, PartSchedulers

    def states(model, optimizer, schedule):
        return {"model": ModelState([model]), "optimizer": OptimizerState([model], [optimizer]),
                "lr_scheduler": LRSchedulerState(PartSchedulers([torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)]))}

    model, optimizer = trained()
    saved = states(model, optimizer, lambda done: 1.0)  # the saved run: a constant lr of 0.1
    saved["lr_scheduler"].scheduler.step()
    CheckpointManager(str(tmp_path), saved, keep_latest_k=0).save(1)
    fresh_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=0.1, weight_decay=0.5)
    CheckpointManager(str(tmp_path), states(fresh_model, fresh, lambda done: 0.25 * done), keep_latest_k=0).load(1)
    group = fresh.param_groups[0]
    assert group["lr"] == pytest.approx(0.1 * 0.25) and group["weight_decay"] == 0.5  # this run's schedule at step 1
    before = optimizer.state_dict()["state"]
    for i, state in fresh.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], before[i]["exp_avg"]) and float(state["step"]) == float(before[i]["step"])


def test_model_only_export_holds_only_weights_in_the_export_dtype(tmp_path):
    model, optimizer = trained()
    m = full_manager(tmp_path, model, optimizer, last_save_model_only=True, export_dtype=torch.bfloat16)
    path = m.save_last(3)
    stored = read_metadata(path).state_dict_metadata
    assert sorted(stored) == sorted(f"model.{k}" for k in model.state_dict())
    assert {meta.properties.dtype for meta in stored.values()} == {torch.bfloat16}
    restored, _ = trained(seed=1)
    m2 = full_manager(tmp_path, restored, torch.optim.Adam(restored.parameters()))
    m2.load(3)  # weights only, widened back to float32
    for p, q in zip(model.state_dict().values(), restored.state_dict().values()):
        assert q.dtype == torch.float32 and torch.equal(q, p.to(torch.bfloat16).float())


class BlockedWrites:
    """Holds every DCP file write until released, to catch a save in the act."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.release, self.started = threading.Event(), threading.Event()
        original = FileSystemWriter.write_data

        def write_data(writer, plan, planner):
            self.started.set()
            assert self.release.wait(timeout=60), "test never released the write"
            if fail:
                raise OSError("disk full")
            return original(writer, plan, planner)

        monkeypatch.setattr(FileSystemWriter, "write_data", write_data)


def test_async_save_overlaps_training_and_equals_a_synchronous_save(tmp_path, monkeypatch):
    model, optimizer = trained()
    full_manager(tmp_path / "sync", model, optimizer).save(1)

    blocked = BlockedWrites(monkeypatch)
    m = full_manager(tmp_path / "async", model, optimizer, async_mode="async")
    assert m.save(1) is None  # returned with the write still held
    assert blocked.started.wait(timeout=60)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # training goes on and changes the weights meanwhile
    assert m.poll() is None and committed_steps(str(tmp_path / "async")) == []
    blocked.release.set()
    assert m.wait() == str(tmp_path / "async" / "step-1")
    assert committed_steps(str(tmp_path / "async")) == [1]

    from_sync, from_async = trained(seed=1), trained(seed=2)
    full_manager(tmp_path / "sync", *from_sync).load(1)
    full_manager(tmp_path / "async", *from_async).load(1)
    assert_same_weights(from_sync[0], from_async[0])
    for a, b in zip(from_sync[1].state_dict()["state"].values(), from_async[1].state_dict()["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_repeated_async_saves_each_hold_the_weights_of_their_step(tmp_path):
    """The staging memory is reused from save to save: every save must still copy its own
    step's values (no stale copy of an earlier step)."""
    model, optimizer = trained()
    m = full_manager(tmp_path / "async", model, optimizer, async_mode="async")
    for step in (1, 2, 3):
        m.save(step)
        m.wait_for_staging()
        full_manager(tmp_path / "sync", model, optimizer).save(step)
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()  # the weights change while the async write is in flight
    m.close()
    for step in (1, 2, 3):
        from_sync, from_async = trained(seed=1), trained(seed=2)
        full_manager(tmp_path / "sync", *from_sync).load(step)
        full_manager(tmp_path / "async", *from_async).load(step)
        assert_same_weights(from_sync[0], from_async[0])
        for a, b in zip(from_sync[1].state_dict()["state"].values(), from_async[1].state_dict()["state"].values()):
            for key in a:
                assert torch.equal(a[key], b[key]), (step, key)


def test_failed_async_write_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, optimizer = trained()
    m = full_manager(tmp_path, model, optimizer, async_mode="async")
    m.save(1)
    assert m.wait() is not None
    blocked = BlockedWrites(monkeypatch, fail=True)
    m.save(2)
    blocked.release.set()
    with pytest.raises(CheckpointError, match="writing checkpoint .*step-2 failed.*disk full.*previous"):
        m.wait()
    assert committed_steps(str(tmp_path)) == [1] and m.resolve_load_step() == 1


def test_a_failed_write_that_need_not_end_the_run_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """Memory snapshots: a store lost with its node fails that snapshot, not the run."""
    model, optimizer = trained()
    m = full_manager(tmp_path, model, optimizer, async_mode="async", failed_write_ends_run=False)
    m.save(1)
    m.wait()
    blocked = BlockedWrites(monkeypatch, fail=True)
    m.save(2)
    blocked.release.set()
    with caplog.at_level(logging.WARNING):
        assert m.wait() is None
    assert "writing checkpoint" in caplog.text and "step-2 failed" in caplog.text
    assert committed_steps(str(tmp_path)) == [1]


def test_crash_after_async_write_before_commit_keeps_previous_latest(tmp_path):
    model, optimizer = trained()

    def crash(step):
        if step == 2:
            raise SystemExit("killed before the commit")

    m = full_manager(tmp_path, model, optimizer, async_mode="async", before_commit=crash)
    m.save(1)
    m.save(2)  # waits for (and commits) step 1 first: at most one save in flight
    with pytest.raises(SystemExit):
        m.close()
    assert committed_steps(str(tmp_path)) == [1]
    assert os.path.isfile(os.path.join(tmp_path, "step-2", ".metadata"))  # written, yet not a checkpoint


def test_resume_skips_weights_only_exports(tmp_path, caplog):
    """A weights-only last save cannot resume a run (no optimizer, schedule or data position):
    the newest full step is taken instead, and with none there is a clear error, never a silent
    restart from step 0 over the old steps."""
    model, optimizer = trained()
    m = full_manager(tmp_path, model, optimizer, last_save_model_only=True)
    m.save(2)
    m.save_last(4)
    assert committed_steps(str(tmp_path)) == [2, 4]
    with caplog.at_level(logging.WARNING):
        assert m.resolve_load_step() == 2
    assert "newer step(s) 4 hold model weights only" in caplog.text
    assert final_export(str(tmp_path), 4) == 4 and final_export(str(tmp_path), 5) is None
    with pytest.raises(CheckpointError, match="load_step = 4: .*step-4 holds model weights only.*initial_load_path"):
        m.resolve_load_step(4)
    os.remove(tmp_path / "step-2" / COMMIT_MARKER)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from: .*step-4 holds model weights only"):
        m.resolve_load_step()


def test_a_second_async_save_waits_for_the_first_to_commit(tmp_path, monkeypatch):
    """At most one save in flight: save(2) commits step 1 before its own write starts."""
    events, lock = [], threading.Condition()
    original_write, original_commit = FileSystemWriter.write_data, CheckpointManager._commit
    release = threading.Event()

    def write_data(writer, plan, planner):
        with lock:
            events.append(("write", os.path.basename(str(writer.path))))
            lock.notify_all()
        assert release.wait(timeout=60), "test never released the write"
        return original_write(writer, plan, planner)

    def commit(self, step, path, model_only):
        events.append(("commit", f"step-{step}"))
        return original_commit(self, step, path, model_only)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    monkeypatch.setattr(CheckpointManager, "_commit", commit)
    model, optimizer = trained()
    m = full_manager(tmp_path, model, optimizer, async_mode="async")
    waiting = threading.Event()
    original_wait = m.wait

    def wait():
        waiting.set()
        return original_wait()

    m.wait = wait
    m.save(1)
    waiting.clear()  # save(1) found nothing in flight
    second = threading.Thread(target=m.save, args=(2,))
    second.start()
    with lock:  # the second save either waits for the first, or (wrongly) starts writing beside it
        assert lock.wait_for(lambda: waiting.is_set() or len(events) > 1, timeout=60)
    release.set()
    second.join(timeout=60)
    m.close()
    assert events == [("write", "step-1"), ("commit", "step-1"), ("write", "step-2"), ("commit", "step-2")]


def test_pinned_memory_mode_on_cpu_saves_like_async(tmp_path, caplog):
    model, optimizer = trained()
    with caplog.at_level(logging.INFO):
        m = full_manager(tmp_path / "pinned", model, optimizer, async_mode="async_with_pinned_mem")
    assert "pinned memory needs CUDA" in caplog.text
    m.save(1)
    assert m.wait() is not None
    full_manager(tmp_path / "sync", model, optimizer).save(1)
    a, b = trained(seed=1), trained(seed=2)
    full_manager(tmp_path / "pinned", *a).load(1)
    full_manager(tmp_path / "sync", *b).load(1)
    assert_same_weights(a[0], b[0])


KILLED_MID_WRITE = textwrap.dedent("""
    import os, signal, sys, threading
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    from raytitan.components.checkpoint.manager import CheckpointManager, ModelState

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    m = CheckpointManager(sys.argv[1], {"model": ModelState([model])}, 0, async_mode="async")
    m.save(1)
    m.wait()
    torch.save(model.state_dict(), sys.argv[2])
    with torch.no_grad():
        model.weight.add_(1.0)
    in_write = threading.Event()
    original = FileSystemWriter.write_data

    def write_data(writer, plan, planner):  # write step 2's data, then hold before its metadata
        done = original(writer, plan, planner)
        done.wait()
        in_write.set()
        threading.Event().wait()
        return done

    FileSystemWriter.write_data = write_data
    m.save(2)
    assert in_write.wait(timeout=60)
    os.kill(os.getpid(), signal.SIGKILL)  # the background write of step 2 is in flight
""")


def test_process_killed_during_an_async_write_leaves_the_previous_step_latest(tmp_path):
    folder, weights = tmp_path / "ckpt", tmp_path / "step1.pt"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(folder), str(weights)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(name.endswith(".distcp") for name in os.listdir(folder / "step-2"))  # step 2 was being written
    assert committed_steps(str(folder)) == [1]
    model = torch.nn.Linear(8, 8)
    m = manager(folder, model)
    assert m.resolve_load_step() == 1
    m.load(1)
    expected = torch.load(weights)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert m.save(2) and committed_steps(str(folder)) == [1, 2]  # the debris is replaced
