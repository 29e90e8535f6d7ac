"""The cluster setups under cluster/: Ray's own launcher validation, and every raytitan command
in them (also in their usage comments) names a real entry point and a config that plans at both
ends of its elastic range, on storage every node shares. Their shell steps (shared storage,
SkyPilot's Ray start) run here against stub commands. The commands shown in the README and
docs/ (docs/clusters.md: the cluster walkthrough) name real entry points and options, and their
configs plan too. Every data and tokenizer path they and configs/ show resolves on a stand-in laid
out as the docs describe (tiny generated files). The SLURM scripts' headers, auth and addresses are checked here; they run whole
against stand-in commands in tests/test_slurm.py. The Dockerfile pins the tested Ray, torch and
Python and copies what exists; cluster/README.md lists every file. Every file under cluster/ is
listed in CHECKED_BY with the tests that check it, so a new one fails until it has some. Nothing
here starts a cluster: `ray up` with the local provider would run `ray stop`, ending every Ray
process on the machine."""

import copy
import glob
import importlib.util
import os
import re
import shlex
import socket
import stat
import subprocess

import pytest
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raytitan.config.job import parse_args
from raytitan.config.plan import plan_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
LAUNCHER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]
ALL_FILES = sorted(os.path.relpath(p, CLUSTER) for p in glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True))
COMMAND = re.compile(r"python -m (raytitan\.\w+)((?:[^\n])*)")
SHARED = re.compile(r"^(/mnt/shared/|s3://|gs://)")  # what every node of a setup sees
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard (job submission), Ray client


def load(name: str) -> dict:
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def commands(name: str) -> list[tuple[str, list[str]]]:
    """(module, args) of every ``python -m raytitan.X`` in a file's values and in its usage
    comments, with line continuations joined as a shell would."""
    with open(os.path.join(CLUSTER, name)) as f:
        comments = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in f if line.lstrip().startswith("#"))
    found = []
    for text in [comments, *strings(load(name))]:
        text = re.sub(r"\\\n\s*", " ", text)
        found += [(m, shlex.split(a.split("#")[0])) for m, a in COMMAND.findall(text)]
    return found


# Every file under cluster/ and the tests here that check it: a new file fails
# test_every_cluster_file_is_checked until it is given a test and listed.
CHECKED_BY = {
    "cluster.yaml": ["test_launcher_config_passes_rays_own_validation", "test_launcher_config_is_closed_and_authenticated",
                     "test_launcher_images_are_current", "test_launcher_config_installs_this_repository_and_the_pinned_torch",
                     "test_commands_name_real_entry_points_and_configs_that_plan",
                     "test_commands_keep_the_run_on_shared_storage",
                     "test_shared_storage_setup_fails_loudly_until_it_is_set"],
    "kuberay/raycluster.yaml": ["test_commands_name_real_entry_points_and_configs_that_plan",
                                "test_commands_keep_the_run_on_shared_storage",
                                "test_kuberay_bounds_match_the_elastic_range", "test_kuberay_clusters_use_token_auth",
                                "test_kuberay_runs_the_image_of_the_dockerfile"],
    "skypilot.yaml": ["test_commands_name_real_entry_points_and_configs_that_plan",
                      "test_commands_keep_the_run_on_shared_storage", "test_skypilot_nodes_hold_the_elastic_range",
                      "test_skypilot_ray_uses_the_shared_token",
                      "test_skypilot_head_starts_ray_and_the_driver_with_token_auth",
                      "test_skypilot_worker_joins_once_the_head_answers",
                      "test_skypilot_worker_gives_up_when_the_head_never_answers"],
    "Dockerfile": ["test_dockerfile_pins_the_tested_ray_torch_and_python_and_copies_what_exists",
                   "test_kuberay_runs_the_image_of_the_dockerfile"],
    "README.md": ["test_cluster_readme_describes_every_file_and_links_what_exists"],
    # The SLURM scripts also run whole against stand-in commands in tests/test_slurm.py.
    "slurm/raytitan.sbatch": ["test_slurm_header_leaves_time_to_stop_before_the_limit",
                              "test_slurm_ray_has_token_auth_and_no_port_opened_to_the_world",
                              "test_ray_script_starts_one_ray_node_per_host_then_the_driver_then_tears_down",
                              "test_ray_script_names_the_nodes_that_never_join_and_stops_the_rest",
                              "test_ray_script_on_usr1_stops_the_driver_then_ray_then_requeues"],
    "slurm/torchrun.sbatch": ["test_slurm_header_leaves_time_to_stop_before_the_limit",
                              "test_slurm_torchrun_starts_no_ray_and_binds_nothing_to_the_world",
                              "test_torchrun_script_runs_one_torchrun_per_node_with_c10d_rendezvous_on_the_first",
                              "test_torchrun_script_on_usr1_stops_the_ranks_then_requeues"],
}
CHECKED_BY["cluster-gcp.yaml"] = CHECKED_BY["cluster.yaml"]
CHECKED_BY["kuberay/rayjob.yaml"] = CHECKED_BY["kuberay/raycluster.yaml"]


def cluster_files() -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, f), CLUSTER)
                  for folder, _, files in os.walk(CLUSTER) for f in files if not f.endswith(".pyc"))


def test_every_cluster_file_is_checked():
    unchecked = sorted(set(cluster_files()) - set(CHECKED_BY))
    assert not unchecked, f"files under cluster/ that no test in tests/test_cluster_files.py checks: {unchecked}"
    assert set(CHECKED_BY) == set(cluster_files()), f"listed but gone: {sorted(set(CHECKED_BY) - set(cluster_files()))}"
    assert set(ALL_FILES) == {f for f in CHECKED_BY if f.endswith(".yaml")}
    from tests import test_slurm

    for name, tests in CHECKED_BY.items():
        for test in tests:
            assert callable(globals().get(test) or getattr(test_slurm, test, None)), (name, test)


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, comments dropped."""
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_pins_the_tested_ray_torch_and_python_and_copies_what_exists():
    import ray

    steps = dockerfile()
    (base,) = [args for op, args in steps if op == "FROM"]
    version, python = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d+)-cu\d+", base).groups()
    assert version == ray.__version__, base
    assert python == "{}{}".format(*__import__("sys").version_info[:2]), base
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert re.search(r"torch==([\d.]+)", runs).group(1) == torch.__version__.split("+")[0]
    copied = [shlex.split(args) for op, args in steps if op == "COPY"]
    for *sources, target in ([a for a in c if not a.startswith("--")] for c in copied):
        assert target.startswith("/home/ray/raytitan/"), target
        for source in sources:
            assert os.path.exists(os.path.join(REPO, source)), source
    assert "pip install --no-cache-dir -e /home/ray/raytitan" in runs
    assert ("WORKDIR", "/home/ray/raytitan") in steps
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        assert "docker build -f cluster/Dockerfile" in f.read()  # built from the repository root


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_runs_the_image_of_the_dockerfile(name):
    """The manifests' configs are read from the image's copy of the repository (/home/ray/raytitan)."""
    images = {v for k, v in _items(load(name)) if k == "image"}
    assert images and all(i.split("/")[-1].split(":")[0] == "raytitan" for i in images), images
    for _, args in commands(name):
        for arg in args:
            if arg.startswith("/home/ray/raytitan/"):
                assert os.path.exists(os.path.join(REPO, arg.removeprefix("/home/ray/raytitan/"))), arg


def _items(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _items(v)
    elif isinstance(value, list):
        for v in value:
            yield from _items(v)


def test_cluster_readme_describes_every_file_and_links_what_exists():
    with open(os.path.join(CLUSTER, "README.md")) as f:
        text = f.read()
    listed = re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE)
    assert sorted(listed) == [f for f in cluster_files() if f != "README.md"]
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert os.path.exists(os.path.join(CLUSTER, link)), link
    for path in re.findall(r"`((?:tests|raytitan|configs|docs)/[\w./-]+)`", text):
        assert os.path.exists(os.path.join(REPO, path)), path


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_own_validation(name):
    config = load(name)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before touching the cloud
    validate_config(prepared)  # Ray's JSON schema
    workers = prepared["available_node_types"]["gpu_worker"]
    assert 0 < workers["min_workers"] < workers["max_workers"] <= prepared["max_workers"]


def world_open_ports(value) -> set[int]:
    """Ports that a security-group rule (AWS IpPermissions) or firewall rule (GCP) anywhere in a
    config opens to 0.0.0.0/0."""
    ports = set()
    if isinstance(value, list):
        for v in value:
            ports |= world_open_ports(v)
    if not isinstance(value, dict):
        return ports
    for v in value.values():
        ports |= world_open_ports(v)
    if "0.0.0.0/0" in {r.get("CidrIp") for r in value.get("IpRanges", [])}:
        if str(value.get("IpProtocol")) == "-1":
            ports |= set(range(65536))
        else:
            ports |= set(range(int(value.get("FromPort", 0)), int(value.get("ToPort", 65535)) + 1))
    if "0.0.0.0/0" in value.get("sourceRanges", []):
        for allowed in value.get("allowed", []):
            for spec in allowed.get("ports", ["0-65535"]):
                low, _, high = str(spec).partition("-")
                ports |= set(range(int(low), int(high or low) + 1))
    return ports


def test_the_open_port_check_sees_rules_open_to_the_world():
    aws = {"provider": {"security_group": {"GroupName": "g", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]}}}
    gcp = {"firewall": [{"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["10000-10010"]}]}]}
    assert world_open_ports(aws) & RAY_PORTS == {8265}
    assert world_open_ports(gcp) & RAY_PORTS == {10001}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_is_closed_and_authenticated(name):
    config = load(name)
    assert not world_open_ports(config) & RAY_PORTS
    head_starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    worker_starts = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head_starts and worker_starts
    for command in head_starts + worker_starts:
        assert "RAY_AUTH_MODE=token" in command, command
    for command in head_starts:
        assert "--head" in command and "--dashboard-host=127.0.0.1" in command and "0.0.0.0" not in command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_images_are_current(name):
    """Ubuntu 22.04 images with drivers for H100 (Ray's "latest_dlami" is Ubuntu 18.04 / CUDA 11.2)."""
    for node_type in load(name)["available_node_types"].values():
        node = node_type["node_config"]
        image = node.get("ImageId") or node["disks"][0]["initializeParams"]["sourceImage"]
        assert "22.04" in image or "2204" in image, image


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_installs_this_repository_and_the_pinned_torch(name):
    config = load(name)
    assert config["file_mounts"]["~/raytitan"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e ~/raytitan" in setup
    pinned = re.search(r"torch==([\d.]+)", setup).group(1)
    assert pinned == torch.__version__.split("+")[0]


@pytest.mark.parametrize("name", ALL_FILES)
def test_commands_name_real_entry_points_and_configs_that_plan(name):
    found = commands(name)
    assert found, f"{name} shows no raytitan command"
    for module, args in found:
        assert importlib.util.find_spec(module) is not None, module
        if module != "raytitan.train":
            continue
        args = [a.replace("/home/ray/raytitan/", "") for a in args]  # the image's copy of the repo
        config_file = args[args.index("--job.config_file") + 1]
        assert os.path.isfile(os.path.join(REPO, config_file)), config_file
        config = parse_args([a if a != config_file else os.path.join(REPO, config_file) for a in args])
        config.model.tokenizer, config.model.hf_assets_path = "byte", None  # the real ones are not here
        low, high = config.ray.worker_range
        for world in {low, high}:
            plan_run(config, world, resolve_data=False)


def flag(args: list[str], name: str) -> str | None:
    """The value a command line gives ``name`` (``--name value`` or ``--name=value``), if any."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("name", ALL_FILES)
def test_commands_keep_the_run_on_shared_storage(name):
    """Without these a run writes checkpoints to one node's local disk (no resume elsewhere) and
    reads the config's defaults (/mnt/data, ./assets), which the setups do not provide."""
    train = [args for module, args in commands(name) if module == "raytitan.train"]
    assert train, f"{name} shows no training command"
    for args in train:
        storage_path = flag(args, "--ray.storage_path")
        assert storage_path and SHARED.match(storage_path), (name, storage_path)
        dataset_path = flag(args, "--training.dataset_path")
        assert dataset_path and SHARED.match(dataset_path), (name, dataset_path)
        assert flag(args, "--model.hf_assets_path"), name


def stub_bin(tmp_path, log, **scripts: str) -> str:
    """A folder of stand-in commands that log their arguments (and the auth mode they see)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for command, body in scripts.items():
        path = folder / command
        path.write_text(f'#!/bin/bash\necho "{command} $* [auth=$RAY_AUTH_MODE:$RAY_AUTH_TOKEN]" >> {log}\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f"{folder}:/usr/bin:/bin"


def shared_storage_step(name: str) -> str:
    (step,) = [c for c in load(name)["setup_commands"] if "SHARED_FS=" in c]
    return step


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_shared_storage_setup_fails_loudly_until_it_is_set(name, tmp_path):
    log = tmp_path / "calls.log"
    log.touch()
    path = stub_bin(tmp_path, log, sudo="exit 0", mountpoint="exit 1", **{"mount.nfs4": "", "mount.nfs": ""})
    step = shared_storage_step(name)
    placeholder = re.search(r"SHARED_FS=(\S+?);", step).group(1)

    def run(value: str) -> tuple[subprocess.CompletedProcess, str]:
        command = step.replace(f"SHARED_FS={placeholder};", f"SHARED_FS={value};", 1)
        log.write_text("")
        done = subprocess.run(["bash", "-c", command], env={"PATH": path}, capture_output=True, text=True, timeout=60)
        return done, log.read_text()

    done, calls = run(placeholder)  # left as shipped
    assert done.returncode != 0 and "SHARED_FS" in done.stderr and calls == ""
    done, calls = run("none")  # the opt-out for a bucket storage_path
    assert done.returncode == 0, done.stderr
    assert "sudo mkdir -p /mnt/shared" in calls and "mount" not in calls.replace("mountpoint", "")
    done, calls = run("fs-0123" if "efs" in step else "10.0.0.2:/share")
    assert done.returncode == 0, done.stderr
    assert re.search(r"sudo mount .*(fs-0123\.efs\.|10\.0\.0\.2:/share).* /mnt/shared", calls), calls
    assert calls.index("sudo mount") < calls.index("sudo chown")


def kuberay_groups(name: str) -> tuple[dict, dict]:
    spec = load(name)["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    (group,) = cluster["workerGroupSpecs"]
    return cluster, group


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_bounds_match_the_elastic_range(name):
    data = load(name)
    assert data["apiVersion"] == "ray.io/v1" and data["kind"] in ("RayCluster", "RayJob")
    cluster, group = kuberay_groups(name)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    (_, args), *_ = [c for c in commands(name) if c[0] == "raytitan.train"]
    config = parse_args([a.replace("/home/ray/raytitan/", REPO + "/") for a in args])
    assert config.ray.worker_range == (group["minReplicas"] * gpus, group["maxReplicas"] * gpus)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_clusters_use_token_auth(name):
    cluster, _ = kuberay_groups(name)
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # Ray's token auth


def test_skypilot_nodes_hold_the_elastic_range():
    task = load("skypilot.yaml")
    count = int(task["resources"]["accelerators"].split(":")[1])
    (_, args), = [c for c in commands("skypilot.yaml") if c[0] == "raytitan.train"]
    config = parse_args([a if not a.startswith("configs/") else os.path.join(REPO, a) for a in args])
    assert config.ray.worker_range[1] == task["num_nodes"] * count
    assert config.ray.worker_range[0] == count  # one node keeps training while another is replaced
    assert task["envs"]["RAY_PORT"] not in ("6379", "6380")
    code = [line.split("#")[0] for line in task["run"].splitlines()]
    assert not [line for line in code if "ray stop" in line]  # would stop SkyPilot's own Ray too


def run_skypilot_node(tmp_path, rank: int, port: int, wait_s: int) -> tuple[subprocess.CompletedProcess, str]:
    """The task's `run` script as node ``rank`` runs it, with stand-ins for ray and python."""
    log = tmp_path / f"calls-{rank}.log"
    log.touch()
    env = {"PATH": stub_bin(tmp_path, log, ray="exit 0", python="exit 0"), "SKYPILOT_NODE_RANK": str(rank),
           "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.2", "RAY_PORT": str(port), "HEAD_WAIT_S": str(wait_s),
           "RAY_AUTH_TOKEN": "t0ken"}
    done = subprocess.run(["bash", "-c", load("skypilot.yaml")["run"]], env=env, capture_output=True, text=True,
                          timeout=120)
    return done, log.read_text()


def test_skypilot_ray_uses_the_shared_token():
    task = load("skypilot.yaml")
    assert "RAY_AUTH_TOKEN" in task["secrets"] and "RAY_AUTH_TOKEN" not in task["envs"]  # a secret, one for all
    code = [line.split("#")[0].strip() for line in task["run"].splitlines()]
    starts = [i for i, line in enumerate(code) if "ray start" in line]
    assert len(starts) == 2
    exported = [i for i, line in enumerate(code) if line == "export RAY_AUTH_MODE=token"]
    assert all("RAY_AUTH_MODE=token" in code[i] or (exported and exported[0] < i) for i in starts)


def test_skypilot_head_starts_ray_and_the_driver_with_token_auth(tmp_path):
    done, calls = run_skypilot_node(tmp_path, rank=0, port=6385, wait_s=0)
    assert done.returncode == 0, done.stderr
    head, driver = calls.splitlines()
    assert head.startswith("ray start --head --port=6385") and head.endswith("[auth=token:t0ken]")
    assert driver.startswith("python -m raytitan.train") and driver.endswith("[auth=token:t0ken]")


def test_skypilot_worker_joins_once_the_head_answers(tmp_path):
    with socket.socket() as head:  # the head's GCS port, listening
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        done, calls = run_skypilot_node(tmp_path, rank=1, port=port, wait_s=30)
    assert done.returncode == 0, done.stderr
    assert calls == f"ray start --address=127.0.0.1:{port} --disable-usage-stats [auth=token:t0ken]\n"


def test_skypilot_worker_gives_up_when_the_head_never_answers(tmp_path):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        done, calls = run_skypilot_node(tmp_path, rank=1, port=port, wait_s=0)
    assert done.returncode != 0 and "did not answer" in done.stderr
    assert calls == ""  # never tried to join


SLURM_SCRIPTS = ["slurm/raytitan.sbatch", "slurm/torchrun.sbatch"]


def sbatch_script(name: str) -> tuple[list[str], list[str]]:
    """A SLURM script's #SBATCH options, and its code lines (comments and blank lines dropped)."""
    with open(os.path.join(CLUSTER, name)) as f:
        lines = f.read().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    options = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only up to the first command.
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH")), name
    code = [line.split(" #")[0].rstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return options, code


def script_default(code: list[str], variable: str) -> int:
    (value,) = [int(m.group(1)) for line in code if (m := re.match(rf"{variable}=\${{{variable}:-(\d+)}}", line))]
    return value


@pytest.mark.parametrize("name", SLURM_SCRIPTS)
def test_slurm_header_leaves_time_to_stop_before_the_limit(name):
    """One task per node; the warning signal goes to the batch shell only (B:), early enough for
    the bounded stop (and, with Ray, Ray's teardown) to end before the time limit; requeueable.
    Only the Ray script keeps its allocation when a node fails (--no-kill): Ray shrinks the group,
    while torchrun's fixed world could not go on."""
    options, code = sbatch_script(name)
    assert "--ntasks-per-node=1" in options and "--requeue" in options and "--exclusive" in options
    (lead,) = [int(o.split("@")[1]) for o in options if o.startswith("--signal=B:USR1@")]
    needed = script_default(code, "STOP_WAIT_S") + (script_default(code, "RAY_STOP_WAIT_S") if "ray" in name else 0)
    assert lead >= needed + 60, (lead, needed)  # SLURM sends it up to 60 s late
    assert ("--no-kill" in options) == name.endswith("raytitan.sbatch")
    assert any(line.startswith("trap on_usr1 USR1") for line in code)


def test_slurm_ray_has_token_auth_and_no_port_opened_to_the_world():
    """Every Ray node advertises its cluster-network address, the dashboard (job submission) stays
    on the head's 127.0.0.1, and Ray runs with a per-job token in a file only the user can read
    (tests/test_slurm.py checks what each stand-in `ray` call sees)."""
    _, code = sbatch_script("slurm/raytitan.sbatch")
    text = "\n".join(code)
    assert "0.0.0.0" not in text and "--dashboard-host=127.0.0.1" in text
    (start,) = [i for i, line in enumerate(code) if "ray start" in line]
    assert "--node-ip-address=" in code[start]
    for line in ("unset RAY_AUTH_TOKEN", "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"):
        assert line in [c.strip() for c in code], line
    assert text.count("umask 077") == 2  # the token's folder and file


def test_slurm_torchrun_starts_no_ray_and_binds_nothing_to_the_world():
    _, code = sbatch_script("slurm/torchrun.sbatch")
    text = "\n".join(code)
    assert "ray start" not in text and "0.0.0.0" not in text
    assert '--rdzv_endpoint="${nodes[0]}:$RDZV_PORT"' in text  # the first node's cluster name


# Commands shown in the README and in docs/ (docs/clusters.md holds the cluster walkthrough).
DOC_PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
DOC_COMMAND = re.compile(r"(?:python -m|torchrun((?: [^`\n]*?)?) -m) (raytitan(?:\.\w+)+)([^`\n]*)")


def doc_commands(page: str) -> list[tuple[str, list[str], list[str]]]:
    """(module, args, torchrun args) of every ``python -m raytitan.X`` or ``torchrun ... -m
    raytitan.X`` in a page's code blocks and inline code, with line continuations joined."""
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    found = []
    for code in [*blocks, *inline]:
        code = re.sub(r"\\\n\s*", " ", code)
        for launcher, module, args in DOC_COMMAND.findall(code):
            words = [w.strip("[]") for w in shlex.split(args.split(" #")[0]) if w not in ("...", "[...]")]
            found.append((module, words, shlex.split(launcher)))
    return found


def test_docs_show_commands():
    assert len(doc_commands("README.md")) >= 3
    assert any(m == "raytitan.train" and "--ray.storage_path" in a for m, a, _ in doc_commands("docs/clusters.md"))


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_commands_name_real_entry_points_and_configs_that_plan(page, capsys):
    for module, args, launcher in doc_commands(page):
        assert importlib.util.find_spec(module) is not None, (page, module)
        if module in ("raytitan.train", "raytitan.worker"):
            if "--help" in args:
                continue
            config_file = flag(args, "--job.config_file")
            if config_file:
                assert os.path.isfile(os.path.join(REPO, config_file)), (page, config_file)
                args = [a if a != config_file else os.path.join(REPO, config_file) for a in args]
            config = parse_args(args)
            config.model.tokenizer, config.model.hf_assets_path = "byte", None  # the real ones are not here
            nproc = flag(launcher, "--nproc_per_node")
            worlds = {int(nproc)} if nproc and nproc.isdigit() else set(config.ray.worker_range)
            for world in worlds:
                plan_run(config, world, resolve_data=False)
            continue
        # Other commands: the subcommand exists and takes every option shown.
        main = importlib.import_module(module).main
        sub = [args[0]] if args and not args[0].startswith("-") else []
        with pytest.raises(SystemExit) as done:
            main([*sub, "--help"])
        assert done.value.code == 0, (page, module, sub)
        usage = capsys.readouterr().out
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in usage, (page, module, option)


# Where the docs put data and tokenizers, laid out as their download commands leave them:
# `hf download allenai/c4 --repo-type dataset --include "en/*" --local-dir <c4>` gives
# <c4>/en/c4-train.XXXXX-of-01024.json.gz, and a model's tokenizer files sit in its assets folder
# (torchtitan's download script, which the configs follow, writes ./assets/hf/<repo name>/).
C4_MIRRORS = ["/mnt/shared/c4", "/lustre/me/c4", "/mnt/data/c4"]  # clusters.md and cluster/, slurm.md, configs/
TOKENIZER_FOLDERS = ["/mnt/shared/assets/Llama-3.1-8B", "/lustre/me/assets/Llama-3.1-8B",
                     *(f"./assets/hf/{name}" for name in ("Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B",
                                                          "Qwen3-8B", "Qwen3-32B", "deepseek-moe-16b-base",
                                                          "DeepSeek-V3"))]
PATH_VALUE = re.compile(r"\b(dataset_path|hf_assets_path)(?:\s*=\s*|\s+)[\"']?((?:/|\./|~/|[a-z0-9]+://)[^\s\"'`\\]*)")


def documented_paths() -> list[tuple[str, str, str]]:
    """(file, key, value) of every dataset_path / hf_assets_path value shown in the README, docs/,
    cluster/ and configs/ (commands, TOML and prose alike). $SHARED paths are tests/test_slurm.py's."""
    files = [*DOC_PAGES, *(os.path.relpath(os.path.join(CLUSTER, f), REPO) for f in cluster_files()),
             *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.toml")))]
    found = []
    for name in files:
        if name == "docs/configuration.md":  # generated from the config's own docs: no paths
            continue
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            found += [(name, key, value) for key, value in PATH_VALUE.findall(f.read())]
    return found


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The documented layout under a temporary root: two tiny C4 shards per mirror, a small tokenizer
    per folder. ``place(path)`` is where a documented path lands in it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from raytitan.components.data.synthetic import write_shard

    root = tmp_path_factory.mktemp("documented")
    place = lambda path: str(root / "repo" / path) if path.startswith("./") else str(root / path.lstrip("/"))
    c4_mirrors = C4_MIRRORS + re.findall(r"hf download allenai/c4 [^`\n]*--local-dir ([^\s`]+)", open(
        os.path.join(REPO, "docs", "data.md"), encoding="utf-8").read())
    for mirror in c4_mirrors:
        os.makedirs(os.path.join(place(mirror), "en"))
        for name in ("c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz",
                     "c4-validation.00000-of-00008.json.gz"):
            write_shard(os.path.join(place(mirror), "en", name), seed=0, index=0, docs=3)
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2, "the": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    for folder in TOKENIZER_FOLDERS:
        os.makedirs(place(folder))
        tokenizer.save(os.path.join(place(folder), "tokenizer.json"))
        with open(os.path.join(place(folder), "tokenizer_config.json"), "w") as f:
            f.write('{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}')
    return place


def check_resolves(place, dataset: str, dataset_path: str | None, hf_assets_path: str | None, where) -> None:
    from raytitan.components.data.sources import resolve_shards
    from raytitan.components.data.tokenizer import build_tokenizer
    from raytitan.config.job import Model

    if dataset_path and "://" not in dataset_path:
        shards = resolve_shards(dataset, place(dataset_path), seed=0)
        assert shards and all(os.path.basename(s).startswith("c4-train.") for s in shards), (where, shards)
    if hf_assets_path:
        assert build_tokenizer(Model(hf_assets_path=place(hf_assets_path))).name == "hf", where


def test_documented_data_and_tokenizer_paths_resolve_on_the_documented_layout(stand_in):
    """Every training command in cluster/ and the docs, and every config, reads its data and tokenizer
    from a stand-in laid out as the docs describe: a path that names the wrong level of the mirror
    (c4/en/en, the assets folder's parent) fails here, not on the cluster."""
    checked = set()
    sources = [(name, module, args) for name in ALL_FILES for module, args in commands(name)]
    sources += [(page, module, args) for page in DOC_PAGES for module, args, _ in doc_commands(page)]
    for where, module, args in sources:
        if module not in ("raytitan.train", "raytitan.worker") or "--help" in args:
            continue
        args = [a.replace("/home/ray/raytitan/", "") for a in args]
        config_file = flag(args, "--job.config_file")
        if config_file:
            args = [a if a != config_file else os.path.join(REPO, config_file) for a in args]
        config = parse_args(args)
        check_resolves(stand_in, config.training.dataset, config.training.dataset_path, config.model.hf_assets_path,
                       (where, args))
        checked |= {config.training.dataset_path, config.model.hf_assets_path}
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.toml"))):
        config = parse_args(["--job.config_file", path])
        check_resolves(stand_in, config.training.dataset, config.training.dataset_path, config.model.hf_assets_path,
                       path)
        checked |= {config.training.dataset_path, config.model.hf_assets_path}
    shown = documented_paths()
    assert len({v for _, _, v in shown}) >= 4, shown
    for where, key, value in shown:  # also what prose shows (docs/data.md's mirror), as the c4 dataset
        if value not in checked:
            check_resolves(stand_in, "c4", value if key == "dataset_path" else None,
                           value if key == "hf_assets_path" else None, where)


def test_the_layout_check_fails_a_wrong_documented_path(stand_in):
    from raytitan.components.data.sources import DataSourceError

    with pytest.raises(DataSourceError, match="no shards"):
        check_resolves(stand_in, "c4", "/mnt/shared/c4/en/en", None, "a path one level too deep")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        check_resolves(stand_in, "c4", None, "/mnt/shared/assets", "the assets folder's parent")
