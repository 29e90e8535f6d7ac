"""Shared test helpers: tiny configs and a spawner of N gloo ranks running the real worker."""

from __future__ import annotations

import json
import os
import socket

import torch.multiprocessing as mp

from raytitan.config import JobConfig


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config_dict: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from raytitan.data.loader import BatchLoader
    from raytitan.runtime import TorchrunRuntime
    from raytitan.worker import run

    # Ledger: the ids of every training row this rank consumed, in order.
    ledger: list = []
    original = BatchLoader.next_batch

    def recording_next_batch(self):
        batch = original(self)
        if self.global_batch_size == config_dict["_ledger_global_batch"]:
            ledger.append({"dp_rank": self.dp_rank, "dp_size": self.dp_size, "ids": batch.ids.tolist()})
        return batch

    BatchLoader.next_batch = recording_next_batch
    torch.set_num_threads(1)
    config = {k: v for k, v in config_dict.items() if not k.startswith("_")}
    state = run(JobConfig.from_dict(config), TorchrunRuntime())
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"losses": state.losses, "validation_losses": state.validation_losses, "step": state.step,
                   "tokens_seen": state.tokens_seen, "ledger": ledger}, f)
    dist.destroy_process_group()


def run_ranks(config: JobConfig, world: int, out_dir: str) -> dict:
    """Run ``raytitan.worker.run`` on ``world`` spawned gloo ranks.

    Returns rank 0's summary, plus ``global_ledger``: per step, the ids of the whole global
    batch, assembled from every data-parallel rank's rows.
    """
    from raytitan.preflight import plan_run

    out = os.path.join(out_dir, f"result-{free_port()}.json")
    payload = {**config.to_dict(), "_ledger_global_batch": plan_run(config, world).global_batch_size}
    mp.start_processes(_worker, args=(world, free_port(), payload, out), nprocs=world,
                       start_method="spawn", join=True)
    ranks = []
    for r in range(world):
        with open(f"{out}.rank{r}") as f:
            ranks.append(json.load(f))
    steps = len(ranks[0]["ledger"])
    by_dp = {}
    for result in ranks:
        for entry in result["ledger"]:
            by_dp.setdefault(entry["dp_rank"], result["ledger"])
    global_ledger = [sum((by_dp[d][k]["ids"] for d in sorted(by_dp)), []) for k in range(steps)]
    return {**ranks[0], "global_ledger": global_ledger}
