"""Shared test helpers: tiny configs and a spawner of N gloo ranks running the real worker."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket

import torch.multiprocessing as mp

from raytitan.config.job import JobConfig


def tiny_config(run_root: str, data_dir: str, **sections) -> JobConfig:
    """Debug model, short sequences, few steps, fp32, deterministic; ``sections`` override keys."""
    base = {
        "job": {"dump_folder": run_root},
        "training": {"seq_len": 64, "local_batch_size": 4, "global_batch_size": 8, "steps": 5,
                     "dataset": "files", "dataset_path": data_dir, "deterministic": True, "seed": 0},
        "lr_scheduler": {"warmup_steps": 2},
        "checkpoint": {"interval": 1000},
        "metrics": {"log_freq": 1, "enable_tensorboard": False},
        "ray": {"name": "run"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return JobConfig.from_dict(base)


class RaytitanLog:
    """raytitan's log records while it is entered (the logger does not propagate once a test in
    this process has set up raytitan's logging, so pytest's caplog alone would miss them)."""

    def __enter__(self):
        import logging

        self.records, self.logger = [], logging.getLogger("raytitan")
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = self.records.append
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    def messages(self, level: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelname == level]


def child_pids(pid: int) -> list[int]:
    """The ids of ``pid``'s child processes (Linux: from /proc)."""
    return [int(entry) for entry, stat in _proc_files("stat") if int(stat.rsplit(")", 1)[1].split()[1]) == pid]


def pids_running(*args: str) -> list[int]:
    """The ids of the processes whose arguments include each of ``args`` (Linux: from /proc)."""
    return [int(entry) for entry, cmdline in _proc_files("cmdline") if all(a in cmdline.split("\0") for a in args)]


def _proc_files(name: str):
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/{name}", errors="replace") as f:
                yield entry, f.read()
        except OSError:  # the process ended meanwhile
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


# Ranks start as forks of one server process that has imported torch and the worker once per
# test session: a spawned rank spends about 4 CPU-seconds importing them, which on the 2-core CI
# machine was minutes of the suite. Each rank still gets the test's environment (``_start``).
START_METHOD = "forkserver"
PRELOAD = ["torch", "torch.distributed.checkpoint", "raytitan.trainer.worker", "raytitan.trainer.build",
           "tests.helpers"]


def _start(fn, args: tuple, world: int):
    """``fn(rank, env, *args)`` on ``world`` processes, each with this process's environment now."""
    multiprocessing.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
    return mp.start_processes(fn, args=(dict(os.environ), *args), nprocs=world, start_method=START_METHOD, join=False)


def _use_env(env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)


def _worker(rank: int, env: dict, world: int, port: int, payloads: list[dict], out: str) -> None:
    _use_env(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    from raytitan.components import storage
    from raytitan.components.metrics import read_metrics
    from raytitan.trainer.loop import Trainer
    from raytitan.trainer.runtime import TorchrunRuntime
    from raytitan.trainer.worker import run

    class LedgerRuntime(TorchrunRuntime):
        """Records the ids of every training row this rank consumes, in order."""

        def __init__(self):
            self.ledger: list = []

        def build_loader(self, purpose, *args, **kwargs):
            loader = super().build_loader(purpose, *args, **kwargs)
            if purpose == "train":
                next_batch = loader.next_batch

                def recording_next_batch():
                    batch = next_batch()
                    self.ledger.append({"dp_rank": loader.dp_rank, "dp_size": loader.dp_size, "ids": batch.ids.tolist()})
                    return batch

                loader.next_batch = recording_next_batch
            return loader

    torch.set_num_threads(1)
    results = []
    for payload in payloads:
        config = JobConfig.from_dict(payload)
        storage.use_root(config.ray.storage_path)  # an object store's endpoint, before reading from it
        logged_before = len(read_metrics(config.run_dir))
        runtime = LedgerRuntime()
        outcome = run(config, runtime)
        torch.distributed.barrier()  # the next run starts when this one ended on every rank, as on a restart
        trained = isinstance(outcome, Trainer)
        state = outcome.state if trained else outcome
        held = {"param_bytes": 0, "optimizer_bytes": 0}
        if trained:
            params = [p for group in outcome.optimizer.param_groups for p in group["params"]]
            held["param_bytes"] = _local_bytes(params)
            held["optimizer_bytes"] = _local_bytes(
                v for o in outcome.optimizer.optimizers for s in o.state.values() for v in s.values() if v.dim() > 0)
        logged = read_metrics(config.run_dir)[logged_before:] if rank == 0 else []
        results.append({"losses": [m["loss"] for m in logged if "loss" in m],
                        "validation_losses": [m["validation/loss"] for m in logged if "validation/loss" in m],
                        "step": state.step, "tokens_seen": state.tokens_seen, "ledger": runtime.ledger, **held})
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)
    _exit_together()


def _global_ledger(ranks: list[dict]) -> list:
    steps = len(ranks[0]["ledger"])
    by_dp = {}
    for result in ranks:
        for entry in result["ledger"]:
            by_dp.setdefault(entry["dp_rank"], result["ledger"])
    return [sum((by_dp[d][k]["ids"] for d in sorted(by_dp)), []) for k in range(steps)]


def run_ranks(config: JobConfig | list[JobConfig], world: int, out_dir: str,
              deadline_s: float = 600.0) -> dict | list[dict]:
    """Run ``raytitan.trainer.worker.run`` on ``world`` spawned gloo ranks; a list of configs runs one
    after the other in the same processes (spawning is the slow part).

    Losses are the ones rank 0 logged to metrics.jsonl during that run (every step with the
    tiny config's ``metrics.log_freq = 1``). Returns, per config, rank 0's summary plus ``global_ledger`` (per step, the ids of the whole
    global batch, assembled from every data-parallel rank's rows) and ``ranks`` (every rank's
    summary, with the bytes of parameters and optimizer state it held).
    """
    configs = config if isinstance(config, list) else [config]
    out = os.path.join(out_dir, f"result-{free_port()}.json")
    payloads = [c.to_dict() for c in configs]
    _join(_start(_worker, (world, free_port(), payloads, out), world), deadline_s)
    per_rank = []
    for r in range(world):
        with open(f"{out}.rank{r}") as f:
            per_rank.append(json.load(f))
    results = []
    for i in range(len(configs)):
        ranks = [per_rank[r][i] for r in range(world)]
        results.append({**ranks[0], "global_ledger": _global_ledger(ranks), "ranks": ranks})
    return results if isinstance(config, list) else results[0]


def _call(rank: int, env: dict, world: int, port: int, fn, args: tuple, out: str) -> None:
    import torch.distributed as dist

    _use_env(env)
    os.environ.update(OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = fn(rank, world, *args)
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    _exit_together()


def _exit_together() -> None:
    """End a rank once every rank is done: tear the group down in step, then leave without
    interpreter finalization, where gloo's threads may still release Python objects (a rare
    abort seen on busy machines). Results are on disk by now."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _join(context, deadline_s: float) -> None:
    """Wait for every rank; a rank that fails fails the test, and so do ranks still running after
    ``deadline_s`` (a hang in a collective is a bug to report, not to wait out)."""
    import time

    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"ranks still running after {deadline_s:.0f}s (a hang in a collective?)")


DEADLINE_S = 600.0


def spawn(fn, world: int, out_dir: str, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's (JSON) result."""
    out = os.path.join(out_dir, f"call-{free_port()}")
    _join(_start(_call, (world, free_port(), fn, args, out), world), DEADLINE_S)
    results = []
    for r in range(world):
        with open(f"{out}.rank{r}") as f:
            results.append(json.load(f))
    return results
