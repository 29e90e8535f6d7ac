"""Stopping on request: the run ends after a step boundary with a committed checkpoint of that step.

What asks: SIGTERM to a worker process (a preemption, SLURM, or torchrun passing on its own
SIGTERM), or the launcher's stop request (the Ray driver got SIGTERM or SIGINT: it leaves
``stop.json`` in the run folder, which rank 0 reads at most every ``POLL_INTERVAL_S``).

Every rank of the world, idle ones too, asks ``StopCheck`` at every step. The answer is one
all-reduce on a CPU group that is posted at one step boundary and read at the next: it travels
while the next step trains, so the ranks agree on the step they stop at without waiting for each
other (no extra sync on the training path). A request that arrives during step N is therefore
acted on after step N + 1: the run saves and commits that step, and ends.

A signal also starts a watchdog: if this process has not finished stopping after
``checkpoint.save_on_signal_timeout_s`` (a collective that never completes, a save that hangs), it
logs the newest committed checkpoint and kills itself (SIGKILL: a hung thread may hold the
interpreter, so nothing gentler is sure to end it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from raytitan.components import storage
from raytitan.components.checkpoint.layout import committed_steps, step_dir

logger = logging.getLogger("raytitan")

# The exit code of a run that stopped on request with its checkpoint committed: sysexits.h's
# EX_TEMPFAIL ("temporary failure; the user is invited to retry"). Running the same command again
# resumes from the step it stopped at, with nothing lost. Distinct from 0 (finished), 1 (failed)
# and 2 (config error), so a scheduler's script can requeue exactly these runs.
EXIT_STOPPED = 75
STOP_FILE = "stop.json"
POLL_INTERVAL_S = 1.0  # rank 0 reads the launcher's request at most this often (a storage read)
LAUNCHER = 1  # why the run stops, as all-reduced: 1 = the launcher's request; otherwise a signal's number


def request_stop(run_dir: str, attempt: str | None, reason: str) -> None:
    """The launcher's request to the workers of ``attempt``: stop after the step in flight, saving it."""
    storage.write_text(storage.join(run_dir, STOP_FILE),
                       json.dumps({"attempt": attempt, "reason": reason, "time": time.time()}))


def read_stop_request(run_dir: str, attempt: str | None) -> str | None:
    """Why the launcher asks ``attempt``'s workers to stop, or None (no request, or another
    attempt's). A request that cannot be read still asks: the launcher writes it only to stop."""
    path = storage.join(run_dir, STOP_FILE)
    if not storage.isfile(path):
        return None
    try:
        request = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        return f"a stop request that cannot be read ({path}: {type(e).__name__})"
    if not isinstance(request, dict) or request.get("attempt") != attempt:
        return None
    return str(request.get("reason") or "the launcher's stop request")


def remove_stop_request(run_dir: str) -> None:
    path = storage.join(run_dir, STOP_FILE)
    if storage.isfile(path):
        storage.remove(path)


class StopCheck:
    """Called by every rank at every step; the reason the whole group stops after this step, or None.

    ``group``: a CPU (gloo) group over the whole world; ``launcher_request``: the runtime's
    ``stop_requested`` (asked on rank 0 only). SIGTERM is caught only where this is built on the
    main thread (torchrun, plain processes); under Ray the launcher's request is the way in.
    """

    def __init__(self, group: dist.ProcessGroup | None, launcher_request: Callable[[], str | None],
                 timeout_s: float, checkpoint_folder: str):
        self.group, self.timeout_s, self.checkpoint_folder = group, timeout_s, checkpoint_folder
        self.rank = dist.get_rank()
        self.launcher_request = launcher_request if self.rank == 0 else None
        self.asked = 0  # what this rank has seen: a signal's number, LAUNCHER, or 0
        self.launcher_reason: str | None = None
        self._last_poll = float("-inf")
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._watchdog: threading.Timer | None = None
        self._caught = threading.current_thread() is threading.main_thread()
        if self._caught:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.asked:
            return  # already stopping (SLURM and torchrun may each send one)
        self.asked = signum
        logger.warning("rank %d: %s received: the group stops after the step in flight and the next, saving it "
                       "(at most %.0f s: checkpoint.save_on_signal_timeout_s)", self.rank,
                       signal.Signals(signum).name, self.timeout_s)
        self._watchdog = threading.Timer(self.timeout_s, self._give_up, args=(signal.Signals(signum).name,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _give_up(self, name: str) -> None:
        steps = committed_steps(self.checkpoint_folder)
        where = f"newest committed checkpoint: {step_dir(self.checkpoint_folder, steps[-1])}" if steps \
            else "no committed checkpoint"
        logger.error("rank %d: %s came %.0f s ago and the run has not stopped (checkpoint.save_on_signal_timeout_s): "
                     "killing this process; %s, where the same command resumes", self.rank, name, self.timeout_s, where)
        for handler in logger.handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, step: int) -> str | None:
        if (self.launcher_request is not None and not self.asked
                and time.monotonic() - self._last_poll >= POLL_INTERVAL_S):
            self._last_poll = time.monotonic()
            self.launcher_reason = self.launcher_request()
            if self.launcher_reason is not None:
                self.asked = LAUNCHER
        agreed = self._collect()
        flag = torch.tensor([self.asked], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        if not agreed:
            return None
        reason = (self.launcher_reason or "the launcher's stop request") if agreed == LAUNCHER \
            else signal.Signals(agreed).name
        if self.rank == 0:
            logger.warning("stopping after step %d on request (%s)", step, reason)
        return reason

    def _collect(self) -> int:
        """The decision posted at the previous step (0 at the first)."""
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())

    def close(self, complete: bool = True) -> None:
        """After the last step: completes the decision in flight (every rank, unless ``complete`` is
        False: on an error, when other ranks may never post theirs) and hands SIGTERM back."""
        if complete:
            self._collect()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._caught:
            previous = self._previous_handler
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            self._caught = False
