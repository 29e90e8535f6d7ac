"""DCP checkpoints with atomic commit and retention.

Layout: ``{folder}/step-N/`` holds the DCP files; ``step-N/COMMITTED`` is written by rank 0
only after every rank finished writing. Only committed steps exist as far as loading is
concerned, so a crash mid-save leaves the previous step as the newest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and what to do."""


class ModelState(Stateful):
    """Model weights as a (possibly sharded) state dict that DCP reshards on load.

    ``parts`` are this rank's pipeline stages (or the one whole model); their parameter names
    are the whole model's, so the merged dict reads the same under any layout."""

    def __init__(self, parts: list[torch.nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            own = {k: state_dict[k] for k in get_model_state_dict(part)}
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter name (flattened), one optimizer per model part."""

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.pairs = list(zip(parts, optimizers))

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part, o in self.pairs for k, v in get_optimizer_state_dict(part, o, options=self.OPTIONS).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, o in self.pairs:
            own = {k: state_dict[k] for k in get_optimizer_state_dict(part, o, options=self.OPTIONS)}
            set_optimizer_state_dict(part, o, own, options=self.OPTIONS)


def step_dir(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step}")


def committed_steps(folder: str) -> list[int]:
    """Committed steps in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, COMMIT_MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_commit(folder: str, step: int) -> dict:
    with open(os.path.join(step_dir(folder, step), COMMIT_MARKER)) as f:
        return json.load(f)


def resolve_load_step(folder: str, load_step: int = -1) -> int | None:
    """The step to resume from: ``load_step`` if given (must be committed), else the newest."""
    steps = committed_steps(folder)
    if load_step >= 0:
        if load_step not in steps:
            raise CheckpointError(
                f"checkpoint.load_step = {load_step}, but {step_dir(folder, load_step)} is not a "
                f"committed checkpoint; committed steps: {steps or 'none'}"
            )
        return load_step
    return steps[-1] if steps else None


class CheckpointManager:
    """Saves every ``interval`` steps and at the end; resumes from the newest committed step."""

    def __init__(self, folder: str, states: dict[str, Stateful], interval: int, keep_latest_k: int,
                 enable: bool = True, process_group: dist.ProcessGroup | None = None,
                 before_commit: Callable[[int], None] | None = None):
        """``process_group``: the ranks that hold state (all by default); ``before_commit``: a hook
        each rank calls after writing its part of step N, before the commit (fault injection)."""
        self.folder, self.states = folder, states
        self.interval, self.keep_latest_k, self.enable = interval, keep_latest_k, enable
        self.group, self.before_commit = process_group, before_commit
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_save_seconds = 0.0

    def save(self, step: int, model_only: bool = False) -> str:
        """Write ``step-N`` on every rank, then commit it. Returns the step folder."""
        t0 = time.perf_counter()
        path = step_dir(self.folder, step)
        if self.rank == 0:
            # An uncommitted folder of the same step is debris from a crashed save.
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.makedirs(path)
        self._barrier()
        states = {"model": self.states["model"]} if model_only else self.states
        dcp.save(states, checkpoint_id=path, process_group=self.group)
        if self.before_commit:
            self.before_commit(step)
        self._barrier()  # every rank wrote its part: only now may rank 0 commit
        if self.rank == 0:
            world = dist.get_world_size(self.group) if dist.is_initialized() else 1
            marker = {"step": step, "world_size": world, "time": time.time(), "model_only": model_only}
            tmp = os.path.join(path, COMMIT_MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump(marker, f)
            os.replace(tmp, os.path.join(path, COMMIT_MARKER))
            self._purge_old()
        self._barrier()
        self.last_save_seconds = time.perf_counter() - t0
        logger.info("saved checkpoint step %d to %s in %.2fs", step, path, self.last_save_seconds)
        return path

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _purge_old(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for step in committed_steps(self.folder)[: -self.keep_latest_k]:
            if step == 0:
                continue  # a seed checkpoint is the run's origin; keep it
            path = step_dir(self.folder, step)
            os.remove(os.path.join(path, COMMIT_MARKER))  # uncommit first: never half-deleted yet valid
            shutil.rmtree(path, ignore_errors=True)

    def resolve_load_step(self, load_step: int = -1) -> int | None:
        return resolve_load_step(self.folder, load_step)

    def load(self, step: int) -> None:
        """Restore every state from ``step-N``, resharded to this run's layout.

        A model-only checkpoint (a seed checkpoint) restores the weights alone.
        """
        path = step_dir(self.folder, step)
        self.load_path(path, model_only=read_commit(self.folder, step).get("model_only", False))

    def load_path(self, path: str, model_only: bool) -> None:
        """Restore from a committed step folder anywhere (e.g. ``checkpoint.initial_load_path``)."""
        if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
            raise CheckpointError(f"{path} is not a committed checkpoint (no {COMMIT_MARKER} file)")
        states = {"model": self.states["model"]} if model_only else self.states
        try:
            dcp.load(states, checkpoint_id=path, process_group=self.group)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"cannot load checkpoint {path}: {_root_cause(e)}. If it is damaged, delete its "
                f"{COMMIT_MARKER} file so the run falls back to the previous step"
            ) from e


def _root_cause(e: BaseException) -> str:
    """One line per failing rank instead of DCP's nested tracebacks."""
    if isinstance(e, CheckpointException):
        causes = {f"{type(w.exception).__name__}: {str(w.exception).splitlines()[0]}" for w in e.failures.values()
                  if hasattr(w, "exception")}
        return "; ".join(sorted(causes)) or str(e).splitlines()[0]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


