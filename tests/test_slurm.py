"""cluster/slurm/*.sbatch without a SLURM cluster: each script runs whole, as sbatch would run it
on the first node, against stand-ins on PATH for scontrol, getent, srun, ray, python and torchrun
(bash scripts that record their arguments, and the auth settings `ray` sees, in one log). srun
runs its command here; `ray start` blocks until SIGTERM like the real one; `ray list nodes`
reports the nodes whose `ray start` ran; the `python` driver exits or waits for SIGTERM as the
test asks. Checked: node list and head address, one Ray node per host, token auth, the join wait
and its timeout, the command that finally runs (its config plans at both ends of the elastic
range and its data resolves on the shared folder), teardown, and stop and requeue on signals.
Static checks of the files (auth, ports, #SBATCH header) are in tests/test_cluster_files.py."""

import gzip
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import time

import pytest

from raytitan.components.data.sources import resolve_shards
from raytitan.config.job import parse_args
from raytitan.config.plan import plan_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "cluster", "slurm")
HOSTS = {"gpu-a01": "10.1.0.11", "gpu-a02": "10.1.0.12", "gpu-b07": "10.1.0.17"}
NODELIST = "gpu-a[01-02],gpu-b07"
JOB = "4242"

# Each stand-in first appends "name arg arg ..." (shell-quoted) to $CALLS, as one write: stand-ins
# run at once (Ray nodes in the background), and lines written in pieces could interleave.
RECORD = 'line="$(printf %s "$(basename "$0")"; printf " %q" "$@")"; printf "%s\\n" "$line" >> "$CALLS"\n'
STANDINS = {
    "scontrol": """
case "$1" in
  show) [ "$2" = hostnames ] && printf '%s\\n' $FAKE_HOSTS ;;
  requeue) ;;
  *) exit 1 ;;
esac""",
    "getent": """
[ "$1" = ahostsv4 ] || exit 2
for pair in $FAKE_IPS; do
  if [ "${pair%%=*}" = "$2" ]; then printf '%s  STREAM %s\\n%s  DGRAM\\n' "${pair#*=}" "$2" "${pair#*=}"; exit 0; fi
done
exit 2""",
    "srun": """
while [[ $1 == -* ]]; do shift; done
exec "$@" """,
    "ray": """
echo "auth $RAY_AUTH_MODE ${RAY_AUTH_TOKEN-unset} $RAY_AUTH_TOKEN_PATH $(stat -c %a "$RAY_AUTH_TOKEN_PATH")" >> "$CALLS"
case "$1" in
  start)
    for a in "$@"; do case "$a" in --node-ip-address=*) ip=${a#*=} ;; esac; done
    if [[ -n $HEAD_FAILS && " $* " == *" --head "* ]]; then exit 1; fi
    [[ " $NEVER_JOIN " == *" $ip "* ]] || echo "$ip" >> "$STATE/joined"
    trap 'echo "ray stopped $ip" >> "$CALLS"; exit 0' TERM
    while :; do sleep 0.05; done ;;
  list)
    if [[ -n $LIST_FAILS ]]; then echo "Error: $LIST_FAILS" >&2; exit 1; fi
    for a in "$@"; do case "$a" in --limit=*) (( ${a#*=} <= 10000 )) || { echo "Error: limit" >&2; exit 1; } ;; esac; done
    printf '['; sep=''
    while read -r ip; do printf '%s{"node_id": "n-%s", "node_ip": "%s", "state": "ALIVE"}' "$sep" "$ip" "$ip"; sep=', '; done < "$STATE/joined"
    echo ']' ;;
esac""",
    # The training driver (python) and torchrun: exit with a code, or wait for SIGTERM and then
    # exit with one, or ignore SIGTERM.
    "python": """
echo "env RAY_ADDRESS=$RAY_ADDRESS" >> "$CALLS"
echo "auth $RAY_AUTH_MODE ${RAY_AUTH_TOKEN-unset} $RAY_AUTH_TOKEN_PATH $(stat -c %a "$RAY_AUTH_TOKEN_PATH" 2>/dev/null)" >> "$CALLS"
case "$DRIVER" in
  exit:*) exit "${DRIVER#exit:}" ;;
  graceful:*) trap 'echo "driver got SIGTERM" >> "$CALLS"; exit "${DRIVER#graceful:}"' TERM ;;
  stubborn) trap 'echo "driver ignored SIGTERM" >> "$CALLS"' TERM ;;
esac
echo "driver started" >> "$CALLS"
while :; do sleep 0.05; done""",
}
STANDINS["torchrun"] = STANDINS["python"]


def standins(tmp_path) -> str:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in STANDINS.items():
        path = folder / name
        path.write_text(f"#!/bin/bash\n{RECORD}{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(folder)


@pytest.fixture
def site(tmp_path):
    """The stand-in site: the commands, a shared folder with a C4 mirror laid out as the hub's, a
    home for the token, and the environment sbatch gives the script on the first node."""
    shared = tmp_path / "shared"
    (shared / "c4" / "en").mkdir(parents=True)
    (shared / "c4" / "en" / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    (shared / "assets" / "Llama-3.1-8B").mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    (state / "joined").touch()
    env = {"PATH": f"{standins(tmp_path)}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "CALLS": str(tmp_path / "calls.log"), "STATE": str(state), "SHARED": str(shared),
           "FAKE_HOSTS": " ".join(HOSTS), "FAKE_IPS": " ".join(f"{h}={ip}" for h, ip in HOSTS.items()),
           "SLURM_JOB_ID": JOB, "SLURM_JOB_NODELIST": NODELIST, "SLURM_NNODES": "3", "SLURM_SUBMIT_DIR": REPO,
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "96", "POLL_S": "0.05", "DRIVER": "exit:0",
           "RAY_AUTH_TOKEN": "a-token-from-elsewhere"}
    return env


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_what_the_test_started():
    """Whatever a failing test leaves behind (the script, its stand-ins) ends with it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start(script: str, env: dict, *args: str) -> subprocess.Popen:
    """The script as sbatch starts it; signals from the test go to the script's shell only (as
    SLURM's --signal=B: does), and its own process group holds everything it starts."""
    proc = subprocess.Popen(["bash", os.path.join(SLURM, script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def calls(env: dict) -> list[str]:
    with open(env["CALLS"]) as f:
        return f.read().splitlines()


def called(env: dict, name: str) -> list[list[str]]:
    """The argument lists of every call of stand-in ``name``."""
    return [shlex.split(line)[1:] for line in calls(env) if line.split(" ", 1)[0] == name]


def run(script: str, env: dict, *args: str) -> tuple[int, str]:
    return finish(start(script, env, *args))


def signal_when_started(proc: subprocess.Popen, env: dict, sig: int, mark: str = "driver started") -> None:
    deadline = time.monotonic() + 30
    while not (os.path.exists(env["CALLS"]) and mark in open(env["CALLS"]).read()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)


def check_training_command(args: list[str], shared: str, world: int, elastic: bool) -> None:
    """The command parses, plans at both ends of its range, and keeps everything on the shared
    folder, where its data resolves (a C4 mirror laid out as the hub's)."""
    args = [a if a != "configs/llama3_8b.toml" else os.path.join(REPO, a) for a in args]
    config = parse_args(args)
    assert config.run_dir == f"{shared}/raytitan/llama3-8B"
    assert config.training.global_batch_size == world
    assert config.model.hf_assets_path == f"{shared}/assets/Llama-3.1-8B"
    assert resolve_shards(config.training.dataset, config.training.dataset_path, 0) == [
        f"{shared}/c4/en/c4-train.00000-of-01024.json.gz"]
    config.model.tokenizer, config.model.hf_assets_path = "byte", None  # no tokenizer files here
    worlds = config.ray.worker_range if elastic else (world,)
    if elastic:
        assert config.ray.worker_range == (8, world)
    for size in worlds:
        plan_run(config, size, resolve_data=False)


def test_ray_script_starts_one_ray_node_per_host_then_the_driver_then_tears_down(site):
    rc, err = run("raytitan.sbatch", site, "--training.steps", "7")
    assert rc == 0, err
    assert called(site, "scontrol")[0] == ["show", "hostnames", NODELIST]
    head, *workers = called(site, "srun")  # the head first; the others start together
    starts = [head, *sorted(workers, key=lambda args: args[2])]
    for args, (host, ip) in zip(starts, HOSTS.items()):
        assert args[:4] == ["--nodes=1", "--ntasks=1", f"--nodelist={host}", "--cpus-per-task=96"]
        assert args[4:7] == ["ray", "start", "--block"]
        assert f"--node-ip-address={ip}" in args and "--num-gpus=8" in args and "--num-cpus=96" in args
    assert "--head" in head and "--port=6379" in head and "--dashboard-host=127.0.0.1" in head
    for args in workers:
        assert "--address=10.1.0.11:6379" in args and "--head" not in args
    log = calls(site)
    first_worker = next(i for i, line in enumerate(log) if line.startswith("srun") and "gpu-a02" in line)
    assert any(line.startswith("ray list nodes") for line in log[:first_worker])  # workers after the head is up
    assert "0.0.0.0" not in "\n".join(log)

    (driver,) = called(site, "python")
    assert driver[:2] == ["-m", "raytitan.train"] and driver[-2:] == ["--training.steps", "7"]
    check_training_command(driver[2:], site["SHARED"], world=24, elastic=True)
    assert f"env RAY_ADDRESS=10.1.0.11:6379" in log
    assert sorted(line for line in log if line.startswith("ray stopped")) == [f"ray stopped {ip}" for ip in HOSTS.values()]
    assert log.index("env RAY_ADDRESS=10.1.0.11:6379") < min(i for i, line in enumerate(log) if line.startswith("ray stopped"))
    assert not called(site, "scontrol")[1:]  # no requeue

    # Token auth: every ray call (and the driver) sees this job's token file, readable by the user
    # only, and not a token inherited from the submitting shell; the file is gone at the end.
    token_dir = os.path.join(site["HOME"], ".ray", "slurm")
    token = os.path.join(token_dir, f"job-{JOB}.token")
    assert {line for line in log if line.startswith("auth ")} == {f"auth token unset {token} 600"}
    assert stat.S_IMODE(os.stat(token_dir).st_mode) == 0o700
    assert not os.path.exists(token)


def test_ray_script_names_the_nodes_that_never_join_and_stops_the_rest(site):
    # The others are listed from the start: the wait's 0..1 s (SECONDS ticks whole seconds) is
    # never too short for them on a busy machine.
    (pathlib.Path(site["STATE"]) / "joined").write_text("10.1.0.11\n10.1.0.12\n")
    site.update(NEVER_JOIN="10.1.0.17", NODES_WAIT_S="1")
    started = time.monotonic()
    rc, err = run("raytitan.sbatch", site)
    assert rc == 1 and time.monotonic() - started < 15
    assert "1 of 3 node(s) did not join Ray within 1s: gpu-b07 (10.1.0.17)" in err
    assert not called(site, "python")
    assert sorted(line for line in calls(site) if line.startswith("ray stopped")) == [
        f"ray stopped {ip}" for ip in HOSTS.values()]


def test_ray_script_says_why_it_cannot_see_the_nodes(site):
    site.update(LIST_FAILS="the dashboard is not up", NODES_WAIT_S="0")
    rc, err = run("raytitan.sbatch", site)
    assert rc == 1
    assert "1 of 1 node(s) did not join Ray within 0s: gpu-a01 (10.1.0.11)" in err
    assert "the head's node list was not readable: error: Error: the dashboard is not up" in err


def test_ray_script_fails_at_once_when_the_head_does_not_start(site):
    site.update(HEAD_FAILS="1")  # NODES_WAIT_S stays 600
    started = time.monotonic()
    rc, err = run("raytitan.sbatch", site)
    assert rc == 1 and time.monotonic() - started < 15
    assert "Ray exited on gpu-a01 before joining" in err
    assert len(called(site, "srun")) == 1 and not called(site, "python")


def test_ray_script_on_usr1_stops_the_driver_then_ray_then_requeues(site):
    site.update(DRIVER="graceful:75")  # raytitan.train: stopped on request, the stop step committed
    proc = start("raytitan.sbatch", site)
    signal_when_started(proc, site, signal.SIGUSR1)
    rc, err = finish(proc)
    assert rc == 75, err
    log = calls(site)
    stopped = [i for i, line in enumerate(log) if line.startswith("ray stopped")]
    assert len(stopped) == 3
    assert log.index("driver got SIGTERM") < min(stopped)
    assert max(stopped) < log.index(f"scontrol requeue {JOB}") == len(log) - 1  # the last thing it does


def test_ray_script_does_not_requeue_a_run_that_finished(site):
    site.update(DRIVER="graceful:0")  # the last step was done as USR1 came
    proc = start("raytitan.sbatch", site)
    signal_when_started(proc, site, signal.SIGUSR1)
    rc, err = finish(proc)
    assert rc == 0 and "the run finished: nothing to requeue" in err
    assert not any(line.startswith("scontrol requeue") for line in calls(site))


def test_ray_script_on_sigterm_stops_without_requeueing(site):
    site.update(DRIVER="graceful:3")
    proc = start("raytitan.sbatch", site)
    signal_when_started(proc, site, signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 3, err
    log = calls(site)
    assert "driver got SIGTERM" in log and len([line for line in log if line.startswith("ray stopped")]) == 3
    assert not any(line.startswith("scontrol requeue") for line in log)


def test_ray_script_kills_a_driver_that_does_not_stop_in_time_and_still_requeues(site):
    site.update(DRIVER="stubborn", STOP_WAIT_S="1")
    proc = start("raytitan.sbatch", site)
    signal_when_started(proc, site, signal.SIGUSR1)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGKILL, err
    assert "the driver did not stop within 1s: killing it" in err
    assert calls(site)[-1] == f"scontrol requeue {JOB}"


def test_ray_script_on_usr1_while_nodes_join_requeues_without_training(site):
    site.update(NEVER_JOIN="10.1.0.17")
    proc = start("raytitan.sbatch", site)
    signal_when_started(proc, site, signal.SIGUSR1, mark="ray start --block --disable-usage-stats --node-ip-address=10.1.0.17")
    rc, err = finish(proc)
    assert rc == 1, err
    assert not called(site, "python")
    assert calls(site)[-1] == f"scontrol requeue {JOB}"


def test_scripts_refuse_to_start_until_shared_storage_is_set(site):
    for script in ("raytitan.sbatch", "torchrun.sbatch"):
        env = {k: v for k, v in site.items() if k != "SHARED"}
        rc, err = run(script, env)
        assert rc == 1 and "set SHARED to a folder every node sees" in err
    assert not os.path.exists(site["CALLS"])  # nothing was started


def resources(script: str, env: dict, *shell: str) -> list[str]:
    """Outputs of shell lines run in a shell that sourced the script (its functions, not main)."""
    code = f"source {shlex.quote(os.path.join(SLURM, script))}\n" + "\n".join(shell)
    done = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("script", ["raytitan.sbatch", "torchrun.sbatch"])
def test_scripts_read_gpus_cpus_and_hosts_from_the_allocation(site, script):
    base = {k: v for k, v in site.items() if not k.startswith(("SLURM_GPUS", "SLURM_CPUS"))}
    lines = ["node_gpus", "node_cpus", "job_nodes"]
    assert resources(script, {**base, "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}, *lines) == [
        "4", "32", *HOSTS]
    assert resources(script, {**base, "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_ON_NODE": "192"},
                     *lines[:2]) == ["8", "192"]
    assert resources(script, base, *lines[:2]) == ["0", "1"]


def test_ray_script_refuses_a_node_address_on_loopback(site):
    site["FAKE_IPS"] = site["FAKE_IPS"].replace("10.1.0.11", "127.0.1.1")
    rc, err = run("raytitan.sbatch", site)
    assert rc == 1 and "gpu-a01 resolves to 127.0.1.1" in err
    assert not called(site, "srun")


def test_torchrun_script_runs_one_torchrun_per_node_with_c10d_rendezvous_on_the_first(site):
    rc, err = run("torchrun.sbatch", site, "--training.steps", "7")
    assert rc == 0, err
    (step,) = called(site, "srun")
    command = step.index("torchrun")
    assert step[:command] == ["--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1"]
    (torchrun,) = called(site, "torchrun")
    assert step[command + 1:] == torchrun
    module = torchrun.index("-m")
    assert torchrun[:module] == ["--nnodes=3", "--nproc_per_node=8", f"--rdzv_id={JOB}", "--rdzv_backend=c10d",
                                 "--rdzv_endpoint=gpu-a01:29500", "--shutdown_timeout=720"]
    assert torchrun[module + 1] == "raytitan.worker" and torchrun[-2:] == ["--training.steps", "7"]
    check_training_command(torchrun[module + 2:], site["SHARED"], world=24, elastic=False)
    assert not called(site, "ray") and not called(site, "scontrol")[1:]


def test_torchrun_script_on_usr1_stops_the_ranks_then_requeues(site):
    site.update(DRIVER="graceful:1")  # torchrun's code when its ranks exit with 75
    proc = start("torchrun.sbatch", site)
    signal_when_started(proc, site, signal.SIGUSR1)
    rc, err = finish(proc)
    assert rc == 1, err
    log = calls(site)
    assert log.index("driver got SIGTERM") < log.index(f"scontrol requeue {JOB}") == len(log) - 1


def test_torchrun_script_kills_ranks_that_do_not_stop_in_time_and_on_sigterm_does_not_requeue(site):
    site.update(DRIVER="stubborn", STOP_WAIT_S="0")
    proc = start("torchrun.sbatch", site)
    signal_when_started(proc, site, signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGKILL, err
    assert "the ranks did not stop within 0s: killing the step" in err
    assert not any(line.startswith("scontrol requeue") for line in calls(site))
