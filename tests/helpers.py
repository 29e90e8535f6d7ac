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
                     "dataset": "c4", "dataset_path": data_dir, "deterministic": True, "seed": 0},
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

    from raytitan.runtime import TorchrunRuntime
    from raytitan.worker import run

    torch.set_num_threads(1)
    state = run(JobConfig.from_dict(config_dict), TorchrunRuntime())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": state.losses, "step": state.step, "tokens_seen": state.tokens_seen}, f)
    dist.destroy_process_group()


def run_ranks(config: JobConfig, world: int, out_dir: str) -> dict:
    """Run ``raytitan.worker.run`` on ``world`` spawned gloo ranks; returns rank 0's summary."""
    out = os.path.join(out_dir, f"result-{free_port()}.json")
    mp.start_processes(_worker, args=(world, free_port(), config.to_dict(), out), nprocs=world,
                       start_method="spawn", join=True)
    with open(out) as f:
        return json.load(f)
