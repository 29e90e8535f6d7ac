"""The two ways users launch: ``python -m raytitan.train`` through Ray, and torchrun (which a
SIGTERM stops at a saved step: docs/elastic.md; the Ray driver's SIGTERM: tests/test_job_submit.py)."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from raytitan.components.checkpoint.layout import committed_steps
from raytitan.components.metrics import read_jsonl
from raytitan.trainer.elastic.history import read_starts

from tests.helpers import child_pids

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"step\s+(\d+)\s+loss\s+([\d.]+)")


def environment(tmp_path) -> dict:
    env = {**os.environ, "RAYTITAN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def run(cmd: list[str], tmp_path, cwd=REPO, timeout=600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=environment(tmp_path), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def run_until_sigterm(cmd: list[str], tmp_path, run_dir, cwd=REPO, timeout=600) -> tuple[int, str]:
    """Start ``cmd``; once the run's first step is done, send SIGTERM to its child processes (the
    ranks torchrun started; SLURM signals every task). Its exit code and output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=environment(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + timeout
        while not (run_dir / "progress.json").exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=max(1.0, end - time.monotonic()))
    finally:
        proc.kill()
    return proc.returncode, out


def losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP_LINE.findall(out)}


def test_train_through_ray(tmp_path):
    # Run from another directory with the default relative dump folder (./outputs):
    # the workers' working directory is not the driver's.
    # (Resubmitting to resume is in tests/test_notebook.py, through fit(): the same launcher.)
    args = [sys.executable, "-m", "raytitan.train", "--checkpoint.interval", "4", "--metrics.log_freq", "4",
            "--validation.enable", "--validation.freq", "4", "--validation.steps", "2", "--checkpoint.keep_latest_k", "1"]
    # Step 4 is saved asynchronously (written while steps 5-8 train); the last save blocks.
    out = run(args + ["--training.steps", "8", "--checkpoint.async_mode", "async"], tmp_path, cwd=tmp_path)
    seen = losses(out)
    assert set(seen) >= {1, 4, 8}
    assert seen[8] < seen[1] - 1.0, seen  # loss falls clearly
    validation = [float(v) for v in re.findall(r"validation at step \d+: loss ([\d.]+)", out)]
    assert len(validation) == 2 and validation[1] < validation[0]
    run_dir = tmp_path / "outputs" / "llama3-debugmodel"
    assert committed_steps(str(run_dir / "checkpoint")) == [8]
    assert re.search(r"steps +8 / 8\n", out) and re.search(r"latest +\S+step-8\n", out)  # Ray's result
    assert glob.glob(str(run_dir / "tb" / "events.out.tfevents.*"))
    assert (run_dir / "config.toml").read_text().count("[training]") == 1
    # Start-up is timed from the run's records (benchmarks/ray_overhead.py): the driver's process,
    # its launch, Ray ready, then the worker's process, then the training function.
    [launch] = read_jsonl(str(run_dir / "launches.jsonl"))
    [start] = read_starts(str(run_dir))
    worker_created = start["time"] - start["timings"]["process_to_entry"]
    assert launch["process_started_at"] < launch["launched_at"] < launch["ray_ready_at"] < worker_created < start["time"]
    assert "finished" in out and "final loss" in out
    assert re.search(r"run llama3-debugmodel finished in [\d.]+s: raytitan run\n", out)  # with job.description


def test_bad_config_fails_before_starting_ray(tmp_path):
    env = {**os.environ, "RAYTITAN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "raytitan.train", "--parallelism.data_parallel_shard_degree", "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "world size is 2" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_same_config_under_torchrun_stops_on_sigterm(tmp_path):
    """SIGTERM to the ranks (a preemption: SLURM signals every task; torchrun passes on its own):
    they stop after the step in flight and the next, with that step committed, and exit 75,
    which torchrun reports (and itself exits 1)."""
    run_dir = tmp_path / "out" / "llama3-debugmodel"
    code, out = run_until_sigterm(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "raytitan.worker",
         "--job.config_file", "configs/llama3_debug.toml", "--job.dump_folder", str(tmp_path / "out"),
         "--training.steps", "8", "--metrics.log_freq", "1"], tmp_path, run_dir)
    assert "torchrun | world 2" in out
    stop = re.search(r"stopped at step (\d+) of 8 on request \(SIGTERM\): checkpoint \S+ committed", out)
    assert stop and code == 1 and len(re.findall(r"^\s*exitcode\s*:\s*75 \(pid", out, re.M)) == 2, out[-5000:]
    assert set(losses(out)) == set(range(1, int(stop[1]) + 1))
    assert committed_steps(str(run_dir / "checkpoint")) == [int(stop[1])]
