"""torch.profiler traces and CUDA memory snapshots, one step out of every ``profile_freq``.

Traces land in ``{run}/{save_traces_folder}/iteration_{step}/rank{r}_trace.json`` (open them in
Perfetto or chrome://tracing); memory snapshots in ``{run}/{save_memory_snapshot_folder}/
iteration_{step}/rank{r}_memory_snapshot.pickle`` (open them at pytorch.org/memory_viz).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle

import torch

logger = logging.getLogger("raytitan")

MEMORY_HISTORY_ENTRIES = 100_000


class CudaMemoryHistory:
    """CUDA allocation history and its snapshot for pytorch.org/memory_viz. torch has only private
    calls for them (torch 2.13: ``torch.cuda.memory._record_memory_history`` and ``_snapshot``, the
    ones torch's own memory-visualization guide uses; the public ``memory_snapshot()`` lacks the
    history): this class is their one use, checked by tests/test_private_apis.py."""

    @staticmethod
    def start(max_entries: int) -> None:
        torch.cuda.memory._record_memory_history(max_entries=max_entries)

    @staticmethod
    def snapshot() -> dict:
        return torch.cuda.memory._snapshot()

    @staticmethod
    def stop() -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


def traced_schedule(freq: int, first_step: int, profiler_step: int) -> torch.profiler.ProfilerAction:
    """The profiler's action for its ``profiler_step``-th step (0 = training step ``first_step``),
    by absolute training step so a resumed run traces the same steps as an uninterrupted one:
    record step s when s % freq == 0, warm up on the step before it, idle otherwise."""
    step = first_step + profiler_step
    if step % freq == 0:
        return torch.profiler.ProfilerAction.RECORD_AND_SAVE
    if (step + 1) % freq == 0:
        return torch.profiler.ProfilerAction.WARMUP
    return torch.profiler.ProfilerAction.NONE


class Profiler:
    """Call ``step(n)`` after every training step and ``close()`` at the end."""

    def __init__(self, settings, run_dir: str, rank: int, device: torch.device, first_step: int):
        self.settings, self.rank, self.device = settings, rank, device
        self.trace_dir = os.path.join(run_dir, settings.save_traces_folder)
        self.snapshot_dir = os.path.join(run_dir, settings.save_memory_snapshot_folder)
        self.step_no = first_step - 1
        self.profiler = None
        self.closing = False
        if settings.enable_profiling:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, schedule=functools.partial(traced_schedule, settings.profile_freq, first_step),
                on_trace_ready=self._save_trace, record_shapes=True)
            self.profiler.start()
        self.snapshots = settings.enable_memory_snapshot and device.type == "cuda"
        if settings.enable_memory_snapshot and not self.snapshots:
            logger.warning("profiling.enable_memory_snapshot records CUDA allocations only; nothing to record here")
        if self.snapshots:
            CudaMemoryHistory.start(MEMORY_HISTORY_ENTRIES)

    def _save_trace(self, prof) -> None:
        if self.closing:  # stopped while set to record a step that never ran
            return
        folder = os.path.join(self.trace_dir, f"iteration_{self.step_no}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info("profiler trace of step %d written to %s", self.step_no, path)

    def step(self, step: int) -> None:
        self.step_no = step
        if self.profiler is not None:
            self.profiler.step()
        if self.snapshots and step % self.settings.profile_freq == 0:
            folder = os.path.join(self.snapshot_dir, f"iteration_{step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle"), "wb") as f:
                pickle.dump(CudaMemoryHistory.snapshot(), f)

    def close(self) -> None:
        if self.profiler is not None:
            self.closing = True
            self.profiler.stop()
            self.profiler = None
        if self.snapshots:
            CudaMemoryHistory.stop()
