"""The driver's side of a graceful stop (raytitan/ray/signals.py), without Ray or workers: a
signal leaves a stop request for the running attempt, the wait for the workers is bounded, a
second SIGINT aborts at once, and how a stopped run ended is told from the progress marker and
the committed checkpoints. (The workers' side: tests/test_distributed.py; both through Ray and
torchrun: tests/test_end_to_end.py.)"""

import os
import signal
import threading
import time

import pytest

import raytitan
from raytitan.components import storage
from raytitan.components.checkpoint.layout import step_dir, write_commit
from raytitan.ray.signals import EXIT_ABORTED, DriverStop, TrainingStopped
from raytitan.trainer.elastic.history import write_progress
from raytitan.trainer.elastic.stop import EXIT_STOPPED, STOP_FILE, read_stop_request


def config(tmp_path, timeout_s=60.0):
    c = raytitan.load_config(None, job__dump_folder=str(tmp_path), ray__name="run", training__steps=8,
                             checkpoint__save_on_signal_timeout_s=timeout_s)
    storage.makedirs(c.run_dir)
    return c


def commit(c, step: int) -> None:
    path = step_dir(os.path.join(c.run_dir, "checkpoint"), step)
    os.makedirs(path)
    write_commit(path, {"step": step})


def send(stop: DriverStop, *signums) -> threading.Thread:
    """Send this process each of ``signums`` from another thread, the second once the driver took
    the first (Python runs the handlers on the main thread, and two pending ones would merge)."""
    def sender():
        for i, signum in enumerate(signums):
            while i and not stop.requested:
                time.sleep(0.01)
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    return thread


def test_sigterm_asks_the_running_attempt_to_stop_and_a_committed_stop_step_ends_with_75(tmp_path):
    c = config(tmp_path)
    (tmp_path / "run" / STOP_FILE).write_text("{}")  # left by a driver that was killed: removed

    def workers():  # stop when asked: save and commit step 3, mark the progress
        while read_stop_request(c.run_dir, "attempt-1") is None:
            time.sleep(0.01)
        commit(c, 3)
        write_progress(c.run_dir, 3, stopped="SIGTERM to the driver")
        return "result"

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = DriverStop(c).install()
    try:
        assert not os.path.exists(os.path.join(c.run_dir, STOP_FILE))
        sender = send(stop, signal.SIGTERM)
        assert stop.run("attempt-1", workers) == "result"
        sender.join()
        stop._on_signal(signal.SIGTERM, None)  # a repeated SIGTERM changes nothing
    finally:
        stop.restore()
    assert stop.requested and not stop.aborted
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handed back
    assert not os.path.exists(os.path.join(c.run_dir, STOP_FILE))
    with pytest.raises(TrainingStopped) as stopped:
        stop.conclude()
    assert stopped.value.exit_code == EXIT_STOPPED == 75 and not stopped.value.aborted
    assert str(stopped.value) == (f"run run stopped at step 3 of 8 on request (SIGTERM): checkpoint "
                                  f"{c.run_dir}/checkpoint/step-3 is committed; run the same command to resume from it")


def test_a_second_sigint_aborts_at_once(tmp_path):
    c = config(tmp_path)
    commit(c, 2)
    never = threading.Event()
    stop = DriverStop(c).install()
    try:
        sender = send(stop, signal.SIGINT, signal.SIGINT)
        t0 = time.monotonic()
        with pytest.raises(TrainingStopped) as aborted:
            stop.run("attempt-1", lambda: never.wait(30))
        assert time.monotonic() - t0 < 5
        sender.join()
    finally:
        stop.restore()
        never.set()
    assert aborted.value.exit_code == EXIT_ABORTED == 130 and aborted.value.aborted and stop.aborted
    assert f"newest committed checkpoint: {c.run_dir}/checkpoint/step-2; run the same command" in str(aborted.value)


def test_workers_that_do_not_stop_in_time_are_abandoned_with_exit_code_1(tmp_path):
    c = config(tmp_path, timeout_s=0.5)
    never = threading.Event()
    stop = DriverStop(c).install()
    try:
        sender = send(stop, signal.SIGTERM)
        with pytest.raises(TrainingStopped) as late:
            stop.run("attempt-1", lambda: never.wait(30))
        sender.join()
    finally:
        stop.restore()
        never.set()
    assert late.value.exit_code == 1 and late.value.aborted
    assert "within checkpoint.save_on_signal_timeout_s = 0.5 s after SIGTERM" in str(late.value)
    assert "no committed checkpoint: running the same command starts the run over" in str(late.value)


def test_a_run_whose_folder_another_run_took_over_ends_at_once_without_saving(tmp_path):
    c = config(tmp_path)
    never, lost = threading.Event(), []
    stop = DriverStop(c)
    threading.Timer(0.3, lambda: lost.append("the lease on run folder x was taken over by pid 7")).start()
    try:
        with pytest.raises(TrainingStopped) as ended:
            stop.run("attempt-1", lambda: never.wait(30), end_if=lambda: lost[0] if lost else None)
    finally:
        never.set()
    assert ended.value.exit_code == 1 and ended.value.aborted and stop.aborted
    assert "ended without saving: the lease on run folder x was taken over by pid 7" in str(ended.value)
    assert read_stop_request(c.run_dir, "attempt-1") is None  # ended, not asked to save


def test_how_a_stopped_run_ended(tmp_path):
    c = config(tmp_path)
    stop = DriverStop(c)
    stop.signal, stop.attempt = "SIGTERM", "attempt-1"
    commit(c, 4)
    write_progress(c.run_dir, 5)  # step 5 trained, but its checkpoint never committed
    with pytest.raises(TrainingStopped) as unsaved:
        stop.conclude()
    assert unsaved.value.exit_code == 1 and "stopped on request (SIGTERM) at step 5, without a committed" \
        in str(unsaved.value) and "step-4; run the same command to resume" in str(unsaved.value)
    write_progress(c.run_dir, 8)  # the stop came too late to matter: the run is finished
    assert stop.conclude() is None
    stop.attempt = None  # the signal came before any worker started
    with pytest.raises(TrainingStopped) as early:
        stop.conclude()
    assert early.value.exit_code == EXIT_STOPPED and "before its workers started" in str(early.value)
