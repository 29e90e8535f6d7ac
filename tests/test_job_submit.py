"""`ray job submit` end to end, as from a laptop: a Ray head started here on 127.0.0.1, the
repository as the job's working_dir, progress streamed back, the checkpoint on the given storage,
and the driver stopped by SIGTERM with the documented exit code."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from raytitan.components.checkpoint.layout import committed_steps

from tests.helpers import free_port, pids_running

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ray_cli(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, **kwargs)


@pytest.fixture(scope="module")
def token_env():
    """Token authentication, as on the shipped clusters: head and submitter share a token
    (given in the environment, so the user's ~/.ray/auth_token is neither used nor needed)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    return env


@pytest.fixture(scope="module")
def ray_head(token_env):
    """A head of our own: `--block` ties its processes to this one, so ending it ends them all
    (never `ray stop`, which would end every Ray instance on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         # Every fixed default port moved too, so another Ray instance on the machine cannot collide.
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        # Ray keeps a 127.0.0.1 node address only where told this machine forms no cluster (else it
        # takes the outward address, and its ports listen on every interface): docs/clusters.md.
        env={**token_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)  # its own process group: ending it can never touch this process
    url = f"http://127.0.0.1:{dashboard}"
    try:
        end = time.monotonic() + 120
        while ray_cli("job", "list", "--address", url, env=token_env, timeout=60).returncode != 0:  # until it answers
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < end, "the head's job API never answered"
        yield url
    finally:
        # The whole process group at once (a SIGTERM to `ray start` stops each process gracefully
        # in turn, about 30 s); nothing of this test needs a graceful end.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        end = time.monotonic() + 60
        while group_alive(head.pid):
            assert time.monotonic() < end, "the head's processes outlived it"
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_job_without_the_token_is_refused(ray_head, token_env):
    env = {**token_env, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN")
    env["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token to fall back on
    proc = ray_cli("job", "submit", "--address", ray_head, "--", "echo", "hello", env=env, timeout=120)
    assert proc.returncode != 0 and "Authentication required" in proc.stdout + proc.stderr


def test_ray_job_submit_runs_checkpoints_and_stops_on_sigterm_to_its_driver(ray_head, token_env, tmp_path):
    """The submitted run trains on the cluster's storage; SIGTERM to its driver after step 1 (what a
    preemption or a scheduler sends; `ray job stop` would SIGKILL it 3 s later) stops the workers
    after the step in flight and the next, with that step committed, and the driver exits 75,
    which Ray's job status reports (docs/elastic.md)."""
    storage = tmp_path / "storage"
    runtime_env = {"excludes": [".git", "outputs", "benchmarks/results", "**/__pycache__", "*.egg-info"],
                   "env_vars": {"RAYTITAN_CACHE": str(tmp_path / "cache")}}
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_head,
                             "--working-dir", REPO, "--runtime-env-json", json.dumps(runtime_env), "--",
                             "python", "-m", "raytitan.train", "--job.config_file", "configs/llama3_debug.toml",
                             "--training.steps", "8", "--metrics.log_freq", "1", "--ray.storage_path", str(storage),
                             "--ray.name", "submitted"],
                            env=token_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 600
        while not (storage / "submitted" / "progress.json").exists() and proc.poll() is None:
            assert time.monotonic() < end, "the job trained no step"
            time.sleep(0.1)
        drivers = [pid for pid in pids_running("-m", "raytitan.train", str(storage)) if pid != proc.pid]
        assert len(drivers) == 1, drivers  # (the submitter's own arguments name the command too)
        os.kill(drivers[0], signal.SIGTERM)
        out, _ = proc.communicate(timeout=max(1.0, end - time.monotonic()))
    finally:
        proc.kill()
    assert proc.returncode == 1 and "failed with exit code 75" in out, out[-5000:]
    stop = re.search(r"stopped at step (\d+) of 8 on request \(SIGTERM\): checkpoint \S+ is committed", out)
    assert stop and 2 <= int(stop[1]) < 8, out[-5000:]
    assert re.search(r"step\s+1\s+loss", out)  # progress streamed back to the submitter
    assert "ray | world 2" in out
    assert "Started a local Ray instance" not in out  # joined the cluster through the job's RAY_ADDRESS
    assert committed_steps(str(storage / "submitted" / "checkpoint")) == [int(stop[1])]
    assert not (storage / "submitted" / "stop.json").exists()  # the driver's request, removed on the way out
