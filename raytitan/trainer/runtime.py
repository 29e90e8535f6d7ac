"""The little a worker asks of whatever launched it: process group, device, data, reporting.

``TorchrunRuntime`` serves plain ``torchrun`` (and single-process) runs; the Ray one lives
in the orchestration layer (``raytitan.ray.runtime``). The training code is the same for both.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from raytitan.components.data.loader import BatchLoader, LocalLoader


def setup_logging(rank: int) -> None:
    """raytitan's own log lines: INFO on rank 0, warnings elsewhere; other libraries untouched."""
    log = logging.getLogger("raytitan")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)


def process_started_at() -> float | None:
    """When this process was created (seconds since the epoch), from Linux's /proc; None
    elsewhere. Start-up is timed from it: imports and the launcher's set-up come before any
    code of ours runs."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the parenthesized command name
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class Runtime:
    name = "base"
    reads_shards = True  # whether this rank reads the data files itself (or is fed)
    attempt: str | None = None  # the launcher's id for this attempt (the grow request names it)

    def init_distributed(self, use_gpu: bool) -> torch.device:
        """Join the process group (if the launcher has not) and return this rank's device."""
        device = self.device(use_gpu)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if "RANK" in os.environ:
                dist.init_process_group(backend, timeout=timedelta(minutes=10))
            else:  # one process, no launcher: a world of one
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return device

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("ray.use_gpu is set but this worker sees no CUDA device")
            index = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def build_loader(self, purpose: str, shards, model_config, tokenizer, seq_len: int, seed: int,
                     global_batch_size: int, dp_rank: int, dp_size: int, shuffle_block: int,
                     reader: int | None = None, readers: int | None = None) -> BatchLoader:
        """This rank's view of the ``purpose`` ("train" or "validation") stream. ``reader`` of
        ``readers``: this rank among all that read it (several share each dp slice under TP/CP/PP)."""
        return LocalLoader(shards, tokenizer, seq_len, seed, global_batch_size, dp_rank, dp_size, shuffle_block)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Hand metrics (and a committed checkpoint) to the launcher; nothing to do without one."""

    def snapshot_folder(self, replicas: int) -> str | None:
        """Where this rank writes memory snapshots (``checkpoint.memory_interval``), kept with
        ``replicas`` copies on other nodes; None: this launcher keeps none (only Ray's does)."""
        return None

    def max_world_size(self, world: int) -> int:
        """The most workers this launcher could restart the group with (``world``: it cannot grow)."""
        return world

    def spare_workers(self, most: int) -> int:
        """How many of ``most`` more workers could be placed now."""
        return 0

    def stop_requested(self) -> str | None:
        """Why the launcher asks the run to stop after the step in flight, saving it (asked on rank
        0, at most every second); None: it does not. Without a launcher, signals are the way in."""
        return None


class TorchrunRuntime(Runtime):
    name = "torchrun"
