"""The driver's side of a graceful stop.

SIGTERM (a preemption, ``ray job stop``, a scheduler's ``scancel``) or SIGINT (Ctrl-C) to the
driver asks the workers, through ``stop.json`` in the run folder, to stop after the step in
flight and the next, with a committed checkpoint of it (``raytitan.trainer.elastic.stop``). The
driver waits for that, at most ``checkpoint.save_on_signal_timeout_s``, and ends with
``TrainingStopped``:

- exit code 75 (``EXIT_STOPPED``): the run stopped at step N with step N's checkpoint committed;
  the same command resumes from it, with nothing lost;
- exit code 1: no checkpoint of the step it stopped at was committed in time (or at all); the
  message names the newest committed checkpoint, where the same command resumes;
- exit code 130 (``EXIT_ABORTED``): a second SIGINT aborts at once, with the same message.

Ray Train's own ``fit`` takes SIGINT for itself (it aborts the workers at once) where it runs on
the main thread, and ``ray.init`` makes SIGTERM exit the driver: so ``fit`` runs on a thread of
its own here, and the main thread keeps the signals while it waits.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from raytitan.components import storage
from raytitan.components.checkpoint.layout import committed_steps, newest_readable_step, step_dir
from raytitan.config.job import JobConfig
from raytitan.trainer.elastic.history import ProgressMarkerError, read_progress
from raytitan.trainer.elastic.stop import EXIT_STOPPED, remove_stop_request, request_stop

EXIT_ABORTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C
WAIT_SLICE_S = 0.2  # how often the waiting main thread wakes (to take signals, and check the time)


class TrainingStopped(Exception):
    """The run stopped on request, short of training.steps; ``exit_code`` says how it ended.
    ``aborted``: the driver ended the workers without their checkpoint (and shut Ray down)."""

    def __init__(self, message: str, exit_code: int, aborted: bool = False):
        super().__init__(message)
        self.exit_code, self.aborted = exit_code, aborted


class DriverStop:
    """Between ``install()`` and ``restore()``, SIGTERM and SIGINT ask the workers to stop (see the
    module docstring). ``run(attempt, fit)`` waits for one attempt of the worker group;
    ``requested`` tells the launcher not to start another; ``conclude()`` raises how the stopped
    run ended."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.timeout_s = config.checkpoint.save_on_signal_timeout_s
        self.signal: str | None = None  # the first signal's name, once one came
        self.deadline: float | None = None
        self.attempt: str | None = None
        self.aborted = False  # by a second SIGINT or the timeout: the workers are to end with the driver
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> DriverStop:
        """Take SIGTERM and SIGINT (on the main thread only: elsewhere they stay as they were)."""
        remove_stop_request(self.config.run_dir)  # one left by a driver that was killed
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        remove_stop_request(self.config.run_dir)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.deadline = name, time.monotonic() + self.timeout_s
            if self.attempt is not None:
                self._request(self.attempt)
            print(f"{name}: stopping run {self.config.run_name}: the workers finish the step in flight and the next, "
                  f"save and commit it (waiting at most {self.timeout_s:g} s: checkpoint.save_on_signal_timeout_s); "
                  "a second Ctrl-C aborts at once", flush=True)
        elif signum == signal.SIGINT:
            self.aborted = True
            raise TrainingStopped(f"run {self.config.run_name} aborted by a second SIGINT, without waiting for the "
                                  f"workers' checkpoint\n{self._where()}", EXIT_ABORTED, aborted=True)
        else:
            print(f"{name}: already stopping run {self.config.run_name} (after {self.signal}); a second Ctrl-C "
                  "aborts at once", flush=True)

    def _request(self, attempt: str) -> None:
        try:
            request_stop(self.config.run_dir, attempt, f"{self.signal} to the driver")
        except OSError as e:  # the run folder's storage failing: the deadline still ends the run
            print(f"could not leave the stop request in {self.config.run_dir} ({type(e).__name__}: {e}); the "
                  "workers go on until checkpoint.save_on_signal_timeout_s ends them", flush=True)

    def run(self, attempt: str, fit: Callable[[], object], end_if: Callable[[], str | None] = lambda: None):
        """``fit()`` on a thread of its own, while this (main) thread takes signals; its result,
        or its exception. Past the deadline after a signal, raises TrainingStopped (exit code 1);
        so it does, at once and without the workers' checkpoint, when ``end_if()`` gives a reason
        (another run took over the run folder: this one must write nothing more there)."""
        self.attempt = attempt
        if self.requested:  # the signal came while this attempt was being set up
            self._request(attempt)
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["result"] = fit()
            except BaseException as e:  # handed to the main thread below
                outcome["error"] = e

        thread = threading.Thread(target=target, name="raytitan-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(WAIT_SLICE_S)
            if thread.is_alive() and (reason := end_if()) is not None:
                self.aborted = True
                raise TrainingStopped(f"run {self.config.run_name} ended without saving: {reason}\n{self._where()}",
                                      1, aborted=True)
            if self.deadline is not None and time.monotonic() > self.deadline and thread.is_alive():
                self.aborted = True
                raise TrainingStopped(
                    f"run {self.config.run_name}: the workers did not stop with a committed checkpoint within "
                    f"checkpoint.save_on_signal_timeout_s = {self.timeout_s:g} s after {self.signal}; ending them "
                    f"with the driver\n{self._where()}", 1, aborted=True)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def conclude(self) -> None:
        """After the workers returned from a stop: raise how it ended, unless the run reached
        training.steps anyway (then it is finished, and this returns)."""
        c = self.config
        if self.attempt is None:
            raise TrainingStopped(f"run {c.run_name} stopped on request ({self.signal}) before its workers started\n"
                                  f"{self._where()}", EXIT_STOPPED)
        folder = storage.join(c.run_dir, c.checkpoint.folder)
        steps = committed_steps(folder)
        try:
            progress = read_progress(c.run_dir)
        except ProgressMarkerError:
            progress = None
        reached = max([s for s in ((progress or {}).get("step"), steps[-1] if steps else None) if s is not None],
                      default=None)
        if reached is not None and reached >= c.training.steps:
            return
        if reached is not None and steps and steps[-1] == reached:
            raise TrainingStopped(
                f"run {c.run_name} stopped at step {reached} of {c.training.steps} on request ({self.signal}): "
                f"checkpoint {step_dir(folder, reached)} is committed; run the same command to resume from it",
                EXIT_STOPPED)
        done = f"at step {reached}" if reached is not None else "before completing a step"
        raise TrainingStopped(f"run {c.run_name} stopped on request ({self.signal}) {done}, without a committed "
                              f"checkpoint of that step\n{self._where()}", 1)

    def _where(self) -> str:
        folder = storage.join(self.config.run_dir, self.config.checkpoint.folder)
        newest = newest_readable_step(folder) if self.config.checkpoint.enable else None
        if newest is None:
            return "no committed checkpoint: running the same command starts the run over"
        return f"newest committed checkpoint: {step_dir(folder, newest)}; run the same command to resume from it"
