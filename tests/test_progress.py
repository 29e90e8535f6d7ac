"""The driver's progress bar: drawn where a person watches (terminal, notebook), left out of a job's
log, and moved by the run folder's progress marker and metrics lines."""

import json
import logging
import os
import pty
import subprocess
import sys
import threading
import time
import types

import pytest

from raytitan.ray import progress
from raytitan.components.metrics import METRICS_FILE
from raytitan.trainer.elastic.history import (PROGRESS_FILE, ProgressMarkerError, read_progress, record_start,
                                              restart_metrics, write_progress)

SHOW_AUTO = "from raytitan.ray.progress import wanted; print('bar' if wanted('auto') else 'no bar', flush=True)"


def wait_for(condition, timeout_s: float = 30.0) -> None:
    """Return once ``condition()`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        tick.wait(0.01)


def append_metrics(run_dir, text: str) -> None:
    with open(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(text)


class Terminal:
    def isatty(self) -> bool:
        return True


class Pipe:
    def isatty(self) -> bool:
        return False


def test_the_setting_wins_over_the_surroundings(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert progress.wanted("on") and not progress.wanted("off")
    monkeypatch.setattr(sys, "stdout", Pipe())
    assert progress.wanted("on") and not progress.wanted("off")


def test_auto_means_a_terminal_or_a_notebook(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stdout", Pipe())
    assert not progress.wanted("auto")  # a job's log
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert progress.wanted("auto")
    monkeypatch.setattr(sys, "stdout", Pipe())  # a notebook kernel's stdout is no terminal
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert progress.wanted("auto")


@pytest.mark.slow  # real processes / many training steps: seconds each
def test_auto_in_real_processes_terminal_versus_job_log():
    """The same decision where a driver really runs: stdout on a terminal, or piped into a log."""
    piped = subprocess.run([sys.executable, "-c", SHOW_AUTO], capture_output=True, text=True, timeout=120)
    assert piped.stdout.strip() == "no bar", piped.stderr

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", SHOW_AUTO], stdout=terminal, stderr=subprocess.DEVNULL)
        os.close(terminal)
        terminal = None
        out = b""
        while True:
            try:
                chunk = os.read(controller, 1024)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert out.decode().strip() == "bar"


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    return str(folder)


def test_the_bar_shows_the_steps_and_newest_loss_of_this_run(run_dir, capsys):
    append_metrics(run_dir, json.dumps({"step": 50, "loss": 9.9}) + "\n")  # an earlier run's line
    bar = progress.ProgressBar(run_dir, total_steps=10, interval_s=3600)  # updated by hand here
    try:
        bar.update()
        assert bar.bar.n == 0 and "loss" not in str(bar.bar.postfix)  # no marker yet, old loss ignored

        write_progress(run_dir, 3)
        append_metrics(run_dir, json.dumps({"step": 3, "loss": 2.5}) + "\n")
        bar.update()
        assert bar.bar.n == 3 and bar.bar.postfix == "loss=2.5000"
        assert "3/10" in capsys.readouterr().err  # what the watcher sees

        append_metrics(run_dir, '{"step": 4, "loss": 1.')  # a line still being written
        bar.update()
        assert bar.bar.postfix == "loss=2.5000"
        append_metrics(run_dir, '25}\n')
        bar.update()
        assert bar.bar.postfix == "loss=1.2500"

        write_progress(run_dir, 2)  # restarted from an earlier checkpoint
        bar.update()
        assert bar.bar.n == 2
    finally:
        bar.close()


def test_the_bar_follows_the_run_until_closed(run_dir):
    bar = progress.ProgressBar(run_dir, total_steps=10, interval_s=0.01)
    try:
        write_progress(run_dir, 7)
        wait_for(lambda: bar.bar.n == 7)
    finally:
        bar.close()
    assert not bar._thread.is_alive()

    late = progress.ProgressBar(run_dir, total_steps=10, interval_s=3600)  # no look before close
    write_progress(run_dir, 10)  # the last step lands just before the run ends
    late.close()
    assert late.bar.n == 10  # close takes a final look


@pytest.fixture
def raytitan_logs(monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("raytitan"), "propagate", True)  # setup_logging may have run
    caplog.set_level(logging.WARNING, logger="raytitan")
    return caplog


def corrupt_marker(run_dir) -> str:
    path = os.path.join(run_dir, PROGRESS_FILE)
    with open(path, "w") as f:
        f.write('{"step": 7, "ti')
    return path


def test_a_missing_marker_is_none_and_a_corrupt_one_an_error_naming_it(run_dir):
    assert read_progress(run_dir) is None
    write_progress(run_dir, 3)
    assert read_progress(run_dir)["step"] == 3
    path = corrupt_marker(run_dir)
    with pytest.raises(ProgressMarkerError, match=path):
        read_progress(run_dir)
    with open(path, "w") as f:
        f.write('{"time": 1.0}')  # JSON, but no step
    with pytest.raises(ProgressMarkerError, match=path):
        read_progress(run_dir)


def start(run_dir, started_at, resumed_step=None):
    return record_start(run_dir, os.path.join(run_dir, "checkpoint"), started_at=started_at, world=2, active=2,
                        dp=2, local_batch=1, accumulation=1, resumed_step=resumed_step, target_steps=10, timings={})


def test_a_corrupt_marker_leaves_the_lost_steps_unknown_with_a_warning(run_dir, raytitan_logs):
    start(run_dir, started_at=1000.0)
    write_progress(run_dir, 7)
    counted = start(run_dir, started_at=1001.0, resumed_step=4)
    assert counted["lost_steps"] == 3 and counted["cause"].startswith("worker group restarted")
    assert "progress" not in raytitan_logs.text  # a readable marker: nothing to say

    path = corrupt_marker(run_dir)
    unknown = start(run_dir, started_at=1002.0, resumed_step=4)
    assert unknown["lost_steps"] is None  # not a made-up 0
    assert "unknown" in unknown["cause"] and path in unknown["cause"]
    assert path in raytitan_logs.text and "lost steps unknown" in raytitan_logs.text
    assert "None steps lost" not in raytitan_logs.text and "? steps lost" in raytitan_logs.text
    assert restart_metrics(run_dir) == {"elastic/restarts": 2.0, "elastic/lost_steps": 3.0}  # the known ones


def test_a_missing_marker_is_a_normal_first_start(run_dir, raytitan_logs):
    first = start(run_dir, started_at=1000.0)
    assert first["cause"] == "first start" and first["lost_steps"] == 0
    assert raytitan_logs.text == ""


def test_the_bar_warns_once_about_a_corrupt_marker(run_dir, raytitan_logs):
    bar = progress.ProgressBar(run_dir, total_steps=10, interval_s=3600)
    try:
        write_progress(run_dir, 3)
        bar.update()
        path = corrupt_marker(run_dir)
        bar.update()
        bar.update()
        assert bar.bar.n == 3  # stays where it was
        warnings = [r.getMessage() for r in raytitan_logs.records if path in r.getMessage()]
        assert len(warnings) == 1 and "progress bar" in warnings[0]
        write_progress(run_dir, 5)
        bar.update()
        assert bar.bar.n == 5
    finally:
        bar.close()
