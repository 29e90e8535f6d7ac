"""One writer per run folder: a live run's lease refuses a second run, naming the holder; a dead
run's lease is taken over with a warning; a run releases its lease when it ends."""

import json
import os
import socket
import subprocess
import time

import pytest

from raytitan.components import lease
from raytitan.components.lease import RunFolderBusy, RunLease, hold_run_folder, read_lease

from tests.helpers import RaytitanLog


def held_by(run_dir, *, host=None, pid=None, heartbeat_age=0.0, kind="the Ray driver") -> dict:
    """A lease as another run would have left it."""
    now = time.time()
    record = {"holder": "other-run", "kind": kind, "host": host or socket.gethostname(), "pid": pid or os.getppid(),
              "started": now - 3600, "heartbeat": now - heartbeat_age}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, lease.LEASE_FILE), "w") as f:
        json.dump(record, f)
    return record


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_live_run_is_refused_naming_the_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    held_by(run_dir, pid=os.getppid())  # the test runner's parent: alive
    with pytest.raises(RunFolderBusy) as refused:
        RunLease.acquire(run_dir, settle_s=0)
    message = str(refused.value)
    assert f"pid {os.getppid()} on host {socket.gethostname()}" in message and "the Ray driver" in message
    assert "started " in message and "ray.name" in message and lease.FORCE_ENV in message
    assert read_lease(run_dir)["holder"] == "other-run"  # left as it was


def test_a_live_lease_on_another_host_holds_until_its_heartbeat_is_stale(tmp_path):
    run_dir = str(tmp_path / "run")
    held_by(run_dir, host="elsewhere", pid=dead_pid(), heartbeat_age=60)  # its pid means nothing here
    with pytest.raises(RunFolderBusy, match="on host elsewhere"):
        RunLease.acquire(run_dir, settle_s=0, stale_after_s=120)
    held_by(run_dir, host="elsewhere", heartbeat_age=121)
    with RaytitanLog() as log:
        taken = RunLease.acquire(run_dir, settle_s=0, stale_after_s=120)
    said = " ".join(log.messages("WARNING"))
    assert "taking over the lease" in said and "121 s old" in said and "host elsewhere" in said
    assert read_lease(run_dir)["holder"] == taken.record["holder"]
    taken.release()


def test_a_crashed_runs_lease_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "SETTLE_S", 0.0)
    run_dir = str(tmp_path / "run")
    pid = dead_pid()
    held_by(run_dir, pid=pid)  # fresh heartbeat, but its process is gone
    with RaytitanLog() as log:
        with hold_run_folder(run_dir) as taken:
            assert f"its process {pid} on this host is gone" in " ".join(log.messages("WARNING"))
            assert read_lease(run_dir)["pid"] == os.getpid()
    assert not os.path.exists(taken.path)  # released at the end


def test_the_holder_renews_and_releases_only_its_own_lease(tmp_path):
    run_dir = str(tmp_path / "run")
    mine = RunLease.acquire(run_dir, settle_s=0)
    first = read_lease(run_dir)["heartbeat"]
    time.sleep(0.01)
    assert mine.renew() and read_lease(run_dir)["heartbeat"] > first
    held_by(run_dir, host="elsewhere")  # forced over by another run (RAYTITAN_TAKE_LEASE=1)
    with RaytitanLog() as log:
        assert not mine.renew() and mine.lost
    assert "taken over by" in " ".join(log.messages("ERROR"))
    mine.release()
    assert read_lease(run_dir)["holder"] == "other-run"  # not this run's to remove


def test_forcing_takes_a_live_lease_and_a_concurrent_start_loses(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    held_by(run_dir)
    monkeypatch.setenv(lease.FORCE_ENV, "1")
    forced = RunLease.acquire(run_dir, settle_s=0)
    forced._stop.set()
    monkeypatch.delenv(lease.FORCE_ENV)
    # Another start wrote over this one's lease while it settled: the last writer keeps it.
    monkeypatch.setattr(lease.time, "sleep", lambda s: held_by(run_dir, kind="a concurrent start"))
    with pytest.raises(RunFolderBusy, match="a concurrent start"):
        RunLease.acquire(str(tmp_path / "run"), force=True, settle_s=0.5)


def test_on_a_folder_a_new_lease_is_created_exclusively(tmp_path, monkeypatch):
    """No wait to take a free folder; a start that finds the file created under it by another
    start's exclusive create is refused."""
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(lease, "SETTLE_S", 60.0)  # never waited for on a free folder
    RunLease.acquire(run_dir).release()
    real_open = os.open

    def created_by_another_start(path, flags, *args):
        if path.endswith(lease.LEASE_FILE) and flags & os.O_EXCL:
            held_by(run_dir, kind="another start")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lease.os, "open", created_by_another_start)
    with pytest.raises(RunFolderBusy, match="another start"):
        RunLease.acquire(run_dir)


def test_ranks_other_than_0_take_no_lease(tmp_path):
    with hold_run_folder(str(tmp_path / "run"), enabled=False):
        assert not os.path.exists(tmp_path / "run")
