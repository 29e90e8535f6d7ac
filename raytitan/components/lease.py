"""One writer per run folder: a lease file that a run holds while it trains.

Two runs on one folder would both call themselves the first start, replace each other's
committed steps and interleave ``metrics.jsonl``. So the driver (under Ray) or rank 0 (under
torchrun) takes ``{run_dir}/lease.json`` before training and renews its heartbeat every
``HEARTBEAT_S``; a second run finds a live lease and stops before training, naming the holder.
A lease is stale, and taken over with a warning, once its heartbeat is older than
``STALE_AFTER_S`` (the holder crashed or was killed), or at once when its holder was a process on
this host that is gone. It is released at a clean end and at a stop on request.

It works wherever the run folder does (``raytitan.components.storage``): plain files, no locks,
so also on shared filesystems and object stores. On a folder a new lease is created exclusively
(``O_EXCL``); on an object store, and when taking over a stale lease, it is written and read back
after ``SETTLE_S``: of two runs starting at the same moment, the one that wrote last keeps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from raytitan.components import storage

logger = logging.getLogger("raytitan")

LEASE_FILE = "lease.json"
HEARTBEAT_S = 15.0  # how often the holder renews its lease
STALE_AFTER_S = 120.0  # a lease whose heartbeat is older than this belongs to a run that is gone
SETTLE_S = 1.0  # between writing a lease and reading it back (a concurrent start's write lands in it)
FORCE_ENV = "RAYTITAN_TAKE_LEASE"  # "1": take the run folder's lease even from a live holder


class RunFolderBusy(RuntimeError):
    """Another live run holds the run folder's lease; the message names it and what to do."""


def lease_path(run_dir: str) -> str:
    return storage.join(run_dir, LEASE_FILE)


def read_lease(run_dir: str) -> dict | None:
    """The lease on ``run_dir``, or None when there is none (or it cannot be understood)."""
    path = lease_path(run_dir)
    if not storage.isfile(path):
        return None
    try:
        lease = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:  # a torn or foreign file: no holder can be named from it
        logger.warning("run folder lease %s cannot be read (%s: %s); treating it as stale", path, type(e).__name__, e)
        return None
    return lease if isinstance(lease, dict) and "holder" in lease else None


def _pid_gone(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stale_reason(lease: dict, stale_after_s: float = STALE_AFTER_S, now: float | None = None) -> str | None:
    """Why ``lease`` no longer protects a live run, or None while its holder may be alive."""
    age = (time.time() if now is None else now) - float(lease.get("heartbeat", 0.0))
    if lease.get("host") == socket.gethostname() and _pid_gone(lease.get("pid")):
        return f"its process {lease.get('pid')} on this host is gone"
    if age > stale_after_s:
        return f"its last heartbeat is {age:.0f} s old (stale after {stale_after_s:g} s)"
    return None


def describe(lease: dict, now: float | None = None) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(lease.get("started", 0.0))))
    age = (time.time() if now is None else now) - float(lease.get("heartbeat", 0.0))
    return (f"{lease.get('kind', 'a run')} pid {lease.get('pid')} on host {lease.get('host')}, started {started}, "
            f"last heartbeat {max(age, 0.0):.0f} s ago")


class RunLease:
    """This process's lease on a run folder: ``acquire``, then ``release`` (or use it as a context
    manager); a daemon thread renews the heartbeat in between."""

    def __init__(self, run_dir: str, kind: str):
        self.run_dir, self.path = run_dir, lease_path(run_dir)
        now = time.time()
        self.record = {"holder": uuid.uuid4().hex, "kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": now, "heartbeat": now, "command": " ".join(sys.argv)[:300]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # who took the lease over while this run held it

    @classmethod
    def acquire(cls, run_dir: str, kind: str = "a run", *, stale_after_s: float = STALE_AFTER_S,
                heartbeat_s: float = HEARTBEAT_S, settle_s: float | None = None, force: bool | None = None) -> RunLease:
        """Take the run folder's lease, or raise RunFolderBusy naming its live holder."""
        force = os.environ.get(FORCE_ENV) == "1" if force is None else force
        settle_s = SETTLE_S if settle_s is None else settle_s
        lease = cls(run_dir, kind)
        storage.makedirs(run_dir)
        held = read_lease(run_dir)
        if held is not None:
            reason = stale_reason(held, stale_after_s)
            if reason is None and not force:
                raise RunFolderBusy(lease._busy_message(held, stale_after_s))
            logger.warning("taking over the lease on run folder %s from %s: %s", run_dir, describe(held),
                           reason or f"{FORCE_ENV}=1")
        if held is None and not storage.is_remote(lease.path):
            if lease._create_local():
                lease._start_heartbeat(heartbeat_s)  # created exclusively: no other start can have it
                return lease
            time.sleep(0.1)  # another start created it just now: let it finish writing
            held = read_lease(run_dir)
            if held is not None and stale_reason(held, stale_after_s) is None and not force:
                raise RunFolderBusy(lease._busy_message(held, stale_after_s))
        lease._write()
        if settle_s > 0:
            time.sleep(settle_s)
        now_held = read_lease(run_dir)
        if now_held is not None and now_held.get("holder") != lease.record["holder"]:  # a concurrent start won
            raise RunFolderBusy(lease._busy_message(now_held, stale_after_s))
        lease._start_heartbeat(heartbeat_s)
        return lease

    def _busy_message(self, held: dict, stale_after_s: float) -> str:
        return (f"run folder {self.run_dir} is in use by another run: {describe(held)}. Two runs on one folder would "
                f"overwrite each other's checkpoints and metrics. Wait for that run to end or stop it, or give this "
                f"one another ray.name or storage path. If that run is gone, its lease is taken over once its "
                f"heartbeat is {stale_after_s:g} s old (at once on its own host); to take it now, delete {self.path} "
                f"or set {FORCE_ENV}=1")

    def _create_local(self) -> bool:
        """Create the lease file on a folder only if none exists (atomic, also on NFS v3+)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def _write(self) -> None:
        storage.write_text(self.path, json.dumps(self.record))

    def renew(self) -> bool:
        """Refresh the heartbeat; False (and nothing written) once another run took the lease over."""
        held = read_lease(self.run_dir)
        if held is not None and held.get("holder") != self.record["holder"]:
            if not self.lost:
                self.lost = f"the lease on run folder {self.run_dir} was taken over by {describe(held)}"
                logger.error("%s: two runs may now write to it; the Ray driver ends this run without saving (under "
                             "torchrun, stop one of them)", self.lost)
            return False
        self.record["heartbeat"] = time.time()
        self._write()
        return True

    def _start_heartbeat(self, every_s: float) -> None:
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # storage trouble: try again at the next beat
                    logger.warning("could not renew the lease on run folder %s (%s: %s)", self.run_dir,
                                   type(e).__name__, e)

        self._thread = threading.Thread(target=beat, name="raytitan-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        try:
            held = read_lease(self.run_dir)
            if held is not None and held.get("holder") == self.record["holder"]:
                storage.remove(self.path)
        except OSError as e:
            logger.warning("could not remove the lease %s (%s: %s); the next run takes it over once it is stale",
                           self.path, type(e).__name__, e)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_folder(run_dir: str, storage_root: str | None = None, *, enabled: bool = True,
                    kind: str = "a run"):
    """A context manager holding the run folder's lease (a no-op where ``enabled`` is false, e.g.
    on ranks other than 0)."""
    if not enabled:
        return contextlib.nullcontext()
    storage.use_root(storage_root)
    return RunLease.acquire(run_dir, kind)
