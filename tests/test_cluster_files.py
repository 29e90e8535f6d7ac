"""The cluster setups under cluster/: Ray's own launcher validation, and every raytitan command
in them (also in their usage comments) names a real entry point and a config that plans at both
ends of its elastic range. Nothing here starts a cluster: `ray up` with the local provider would
run `ray stop`, ending every Ray process on the machine."""

import copy
import glob
import importlib.util
import os
import re
import shlex

import pytest
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raytitan.config import parse_args
from raytitan.preflight import plan_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
LAUNCHER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]
ALL_FILES = sorted(os.path.relpath(p, CLUSTER) for p in glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True))
COMMAND = re.compile(r"python -m (raytitan\.\w+)((?:[^\n])*)")


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


def test_every_cluster_file_is_covered():
    assert set(ALL_FILES) >= {"cluster.yaml", "cluster-gcp.yaml", "skypilot.yaml", "kuberay/raycluster.yaml",
                              "kuberay/rayjob.yaml"}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_own_validation(name):
    config = load(name)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before touching the cloud
    validate_config(prepared)  # Ray's JSON schema
    workers = prepared["available_node_types"]["gpu_worker"]
    assert 0 < workers["min_workers"] < workers["max_workers"] <= prepared["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_is_closed_and_authenticated(name):
    config = load(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token" in c for c in config[key] if "ray start" in c), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "provider" in config and "ports" not in str(config["provider"])  # no extra open ports


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
