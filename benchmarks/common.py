"""Shared by the benchmark scripts: device description, a free port, a result table, and a JSON line per run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (results files aside: the
    benchmarks themselves append to them), so a number is never credited to code it did not run."""
    repo = os.path.dirname(os.path.dirname(RESULTS_DIR))

    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], text=True, cwd=repo, stderr=subprocess.DEVNULL).strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      f":(exclude){os.path.relpath(RESULTS_DIR, repo)}")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if changed else head


def free_port() -> int:
    """A local TCP port nobody listens on, for a spawned process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return "" if v is None else str(v)


def record(benchmark: str, config: dict, results: list[dict], results_dir: str = RESULTS_DIR) -> dict:
    """Append one JSON line to <results_dir>/<benchmark>.jsonl and return it."""
    import torch

    line = {"benchmark": benchmark, "device": device_name(), "date": datetime.date.today().isoformat(),
            "commit": commit(), "torch": torch.__version__, "config": config, "results": results}
    append_json(os.path.join(results_dir, f"{benchmark}.jsonl"), line)
    print(json.dumps(line))
    return line


def append_json(path: str, obj: dict) -> None:
    """One JSON line, flushed to disk before returning: what a killed sweep leaves behind is readable."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def steady(records: list[dict], key: str, skip: int) -> float:
    """Median of ``key`` over the logged steps after the first ``skip`` (start-up, compilation)."""
    import statistics

    values = [r[key] for r in records if "loss" in r and r["step"] > skip and key in r]
    if not values:
        raise RuntimeError(f"no logged steps after step {skip} carry {key}")
    return statistics.median(values)


def run_worker(overrides: dict, run_root: str, name: str, nproc: int = 1, timeout: int = 3600) -> list[dict]:
    """Train with the per-worker entry point in fresh processes (torchrun for several), the same
    code Ray runs; returns the run's metrics.jsonl records. ``overrides``: {"section.key": value}."""
    import sys

    from raytitan.components.metrics import read_metrics

    args = ["--job.dump_folder", run_root, "--ray.name", name, "--metrics.log_freq", "1",
            "--metrics.enable_tensorboard", "false", "--checkpoint.enable", "false"]
    for key, value in overrides.items():
        args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "raytitan.worker"]
    else:
        cmd = [sys.executable, "-m", "raytitan.worker"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return read_metrics(os.path.join(run_root, name))
