"""DCP checkpoints with atomic commit and retention.

Layout: ``{folder}/step-N/`` holds the DCP files; ``step-N/COMMITTED`` is written by rank 0
only after every rank finished writing. Only committed steps exist as far as loading is
concerned, so a crash mid-save leaves the previous step as the newest; a committed step whose
files were damaged later is skipped with a warning. Loads check keys and shapes first, so a
wrong checkpoint is an error naming the key, never a partial load.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from raytitan import storage

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
    return storage.join(folder, f"step-{step}")


def committed_steps(folder: str) -> list[int]:
    """Committed steps in ``folder``, oldest first."""
    steps = []
    for name in storage.listdir(folder):
        m = STEP_DIR.match(name)
        if m and storage.isfile(storage.join(folder, name, COMMIT_MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_commit(folder: str, step: int) -> dict:
    return read_commit_at(step_dir(folder, step))


def read_commit_at(path: str) -> dict:
    return json.loads(storage.read_text(storage.join(path, COMMIT_MARKER)))


def write_commit(path: str, marker: dict) -> None:
    """Mark a fully written step folder as usable (atomically)."""
    storage.write_text(storage.join(path, COMMIT_MARKER), json.dumps(marker))


def read_metadata(path: str) -> Metadata:
    try:
        return storage.dcp_reader(path).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no DCP metadata file (.metadata): it is not a complete checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}/.metadata cannot be read ({type(e).__name__}: {e}): the checkpoint is damaged") from None


def check_files(path: str, metadata: Metadata | None = None) -> Metadata:
    """Every data file the metadata points to exists and is long enough; raise naming the first
    file (and a key in it) that is missing or truncated."""
    metadata = metadata or read_metadata(path)
    needed: dict[str, tuple[int, str]] = {}  # file -> (bytes it must hold, a key stored at its end)
    for index, info in metadata.storage_data.items():
        end = info.offset + info.length
        if end > needed.get(info.relative_path, (0, ""))[0]:
            needed[info.relative_path] = (end, index.fqn)
    for name, (size, key) in sorted(needed.items()):
        file = storage.join(path, name)
        found = storage.size(file)
        if found < 0:
            raise CheckpointError(f"{file} is missing (it holds '{key}' among others): the checkpoint is incomplete")
        if found < size:
            raise CheckpointError(f"{file} is truncated: {found} bytes, but '{key}' ends at byte {size}")
    return metadata


def tensor_shapes(states: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Global shapes of the tensors in (nested) state dicts, keyed as DCP flattens them."""
    shapes = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            value = value.state_dict()
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            shapes[prefix] = tuple(value.shape)

    visit("", states)
    return shapes


def check_compatible(path: str, metadata: Metadata, expected: dict[str, tuple[int, ...]],
                     model_keys: set[str] | None = None) -> None:
    """The checkpoint holds every tensor ``expected`` names, in that shape (and, given the model's
    full key set, no model weights the model lacks): a clear error instead of a partial load."""
    stored = metadata.state_dict_metadata
    for key, shape in expected.items():
        meta = stored.get(key)
        if meta is None:
            raise CheckpointError(f"checkpoint {path} has no '{key}': it was saved from a different model "
                                  "(or without that state: see checkpoint.exclude_from_loading)")
        if not hasattr(meta, "size"):
            raise CheckpointError(f"checkpoint {path}: '{key}' is stored as bytes, not a tensor")
        if tuple(meta.size) != shape:
            raise CheckpointError(f"checkpoint {path}: '{key}' has shape {list(meta.size)} but this model's is "
                                  f"{list(shape)}: was it saved from another model.flavor or tokenizer?")
    if model_keys is not None:
        extra = sorted(k for k in stored if k.startswith("model.") and k.removeprefix("model.") not in model_keys)
        if extra:
            raise CheckpointError(f"checkpoint {path} has {len(extra)} model weights this model lacks "
                                  f"(first: '{extra[0]}'): was it saved from another model.flavor?")


def is_export(folder: str, step: int) -> bool:
    """A committed step after the start that holds model weights only (``last_save_model_only``):
    weights to take away, not a state a run can resume from (a step-0 seed is a run's origin)."""
    return step > 0 and read_commit(folder, step).get("model_only", False)


def loadable_step(folder: str, load_step: int = -1) -> int | None:
    """The step to resume from: ``load_step`` if given (it must be committed and intact), else the
    newest committed step whose files are intact. Damaged newer steps are skipped with a warning,
    and so are weights-only exports (they lack the optimizer, schedule and data position).

    Depends only on what is on storage, so every rank (also one that idles) picks the same step."""
    steps = committed_steps(folder)
    if load_step >= 0:
        if load_step not in steps:
            raise CheckpointError(
                f"checkpoint.load_step = {load_step}, but {step_dir(folder, load_step)} is not a "
                f"committed checkpoint; committed steps: {steps or 'none'}"
            )
        if is_export(folder, load_step):
            raise CheckpointError(f"checkpoint.load_step = {load_step}: {_export_advice(folder, load_step)}")
        check_files(step_dir(folder, load_step))
        return load_step
    problems, exports = [], []
    for step in reversed(steps):
        if is_export(folder, step):
            exports.append(step)
            continue
        try:
            check_files(step_dir(folder, step))
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint %s: %s", step_dir(folder, step), e)
            problems.append(str(e))
            continue
        if exports:
            logger.warning("resuming from step-%d: the newer step(s) %s hold model weights only", step,
                           ", ".join(map(str, sorted(exports))))
        return step
    if problems:
        raise CheckpointError(f"every committed checkpoint in {folder} is damaged: " + "; ".join(problems) +
                              ". Move the folder away to start over, or repair it")
    if exports:
        raise CheckpointError(f"{folder} has no checkpoint to resume from: {_export_advice(folder, max(exports))}")
    return None


def final_export(folder: str, total_steps: int) -> int | None:
    """The weights-only last save of a run that reached ``total_steps``, if there is one: such a
    run is finished, and starting it again would only redo its tail."""
    done = [s for s in committed_steps(folder) if s >= total_steps and is_export(folder, s)]
    return max(done) if done else None


def _export_advice(folder: str, step: int) -> str:
    return (f"{step_dir(folder, step)} holds model weights only (checkpoint.last_save_model_only), not the "
            "optimizer, schedule and data position a resume needs. To train on from those weights, start a new "
            f"run (another ray.name) with checkpoint.initial_load_path = {step_dir(folder, step)}")


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOADABLE = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")


class CheckpointManager:
    """Saves every ``interval`` steps and at the end; resumes from the newest committed step.

    With ``async_mode`` the write of a step overlaps the next training steps: ``save`` returns
    once the state is copied (staged), the step is committed when its write completes (see
    ``poll``), and at most one save is in flight.
    """

    def __init__(self, folder: str, states: dict[str, Stateful], interval: int, keep_latest_k: int,
                 enable: bool = True, process_group: dist.ProcessGroup | None = None,
                 before_commit: Callable[[int], None] | None = None, async_mode: str = "disabled",
                 exclude_from_loading: tuple[str, ...] | list[str] = (), model_keys: set[str] | None = None,
                 commit_info: dict | None = None, last_save_model_only: bool = False,
                 export_dtype: torch.dtype = torch.float32, last_save_in_hf: bool = False):
        """``process_group``: the ranks that hold state (all by default; a gloo group for async
        saves); ``before_commit``: a hook each rank calls after writing its part of step N, before
        the commit (fault injection); ``model_keys``: the whole model's parameter names, to reject
        checkpoints of bigger models; ``commit_info``: extra facts for the commit marker (the
        model's shape, for exports); the ``last_*`` and ``export_dtype`` options shape the run's
        last save (see ``save_last``)."""
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"checkpoint.async_mode = {async_mode!r} is not one of {', '.join(ASYNC_MODES)}")
        self.folder, self.states = folder, states
        self.interval, self.keep_latest_k, self.enable = interval, keep_latest_k, enable
        self.group, self.before_commit = process_group, before_commit
        self.async_mode, self.exclude = async_mode, set(exclude_from_loading)
        self.model_keys, self.commit_info = model_keys, commit_info or {}
        self.last_save_model_only, self.export_dtype, self.last_save_in_hf = last_save_model_only, export_dtype, last_save_in_hf
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_save_seconds = 0.0  # how long the last save blocked training
        self._pending: _PendingSave | None = None
        self._stager = None
        if async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            logger.info("checkpoint.async_mode = async_with_pinned_mem: pinned memory needs CUDA; staging in "
                        "ordinary memory as async does")
        self._committed: str | None = None  # newest step this rank committed, not yet taken

    # ------------------------------------------------------------------ saving

    def save(self, step: int, model_only: bool = False, dtype: torch.dtype | None = None,
             blocking: bool | None = None) -> str | None:
        """Write ``step-N`` on every rank and commit it. Returns the step folder once committed,
        or None while an async write is still in flight. ``dtype`` converts a model-only save's
        weights (an export); ``blocking`` overrides the async mode (the last save of a run)."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        path = step_dir(self.folder, step)
        if self.rank == 0:
            # An uncommitted folder of the same step is debris from a crashed save; a committed one
            # is an export, damaged, or newer than the load_step this run resumed from.
            if storage.isfile(storage.join(path, COMMIT_MARKER)):
                logger.warning("replacing the committed %s%s with a new save of that step", path,
                               " (weights only)" if is_export(self.folder, step) else "")
            storage.rmtree(path)
            storage.makedirs(path)
        self._barrier()
        states = self._states_to_save(model_only, dtype)
        if blocking is False or (blocking is None and self.async_mode != "disabled"):
            response = dcp.async_save(states, checkpoint_id=path, storage_writer=storage.dcp_writer(path),
                                      process_group=self.group, async_stager=self._async_stager())
            staged, written = (response.staging_completion, response.upload_completion) \
                if isinstance(response, AsyncSaveResponse) else (None, response)
            self._pending = _PendingSave(step, path, model_only, written, staged, t0)
            self.last_save_seconds = time.perf_counter() - t0
            logger.info("checkpoint step %d: staged in %.2fs, writing in the background", step, self.last_save_seconds)
            return None
        dcp.save(states, checkpoint_id=path, storage_writer=storage.dcp_writer(path), process_group=self.group)
        if self.before_commit:
            self.before_commit(step)
        self._barrier()  # every rank wrote its part: only now may rank 0 commit
        if self.rank == 0:
            self._commit(step, path, model_only)
        self._barrier()
        self.last_save_seconds = time.perf_counter() - t0
        logger.info("saved checkpoint step %d to %s in %.2fs", step, path, self.last_save_seconds)
        return path

    def save_last(self, step: int) -> str:
        """The run's last save: blocking, optionally weights only in ``export_dtype``, and
        optionally exported as a Hugging Face folder ``step-N-hf`` next to it (by rank 0)."""
        dtype = self.export_dtype if self.last_save_model_only and self.export_dtype != torch.float32 else None
        path = self.save(step, model_only=self.last_save_model_only, dtype=dtype, blocking=True)
        if self.last_save_in_hf and self.rank == 0:
            from raytitan.checkpoint_io import export_hf  # reads checkpoints offline; imports this module

            t0 = time.perf_counter()
            out = export_hf(path, path + "-hf", dtype=self.export_dtype)
            logger.info("exported step %d as a Hugging Face folder %s in %.2fs", step, out, time.perf_counter() - t0)
        return path

    def _states_to_save(self, model_only: bool, dtype: torch.dtype | None) -> dict[str, Any]:
        if not model_only:
            return self.states
        if dtype is None:
            return {"model": self.states["model"]}
        return {"model": {k: v.detach().to(dtype) for k, v in self.states["model"].state_dict().items()}}

    def _async_stager(self) -> DefaultStager:
        """One stager for the whole run, so its staging memory is reused from save to save
        (allocating it anew for every save more than doubled the stall in benchmarks/checkpoint.py):
        pinned memory with the copy in the background on CUDA for ``async_with_pinned_mem``, a
        plain blocking copy otherwise."""
        if self._stager is None:
            pinned = self.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=pinned, use_non_blocking_copy=pinned))
        return self._stager

    def wait_for_staging(self) -> None:
        """Block until an in-flight save has copied the weights (call before changing them)."""
        if self._pending is not None and self._pending.staged is not None:
            self._pending.staged.result()
            self._pending.staged = None

    def poll(self) -> str | None:
        """Commit the in-flight save if its write completed; returns the folder committed by this
        call on rank 0 (None elsewhere, or when nothing completed). Not collective."""
        if self._pending is None or not self._pending.written.done():
            return None
        return self._finish_pending()

    def wait(self) -> str | None:
        """Finish the in-flight save, if any (collective: every rank calls it at the same point)."""
        if self._pending is None:
            return None
        return self._finish_pending()  # blocks until the write completes

    def close(self) -> None:
        """Clean shutdown: the in-flight save completes and commits."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _finish_pending(self) -> str | None:
        pending, self._pending = self._pending, None
        try:
            pending.written.result()
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            raise CheckpointError(f"writing checkpoint {pending.path} failed: {_root_cause(e)}; the previous "
                                  "committed checkpoint stays the latest") from e
        if self.before_commit:
            self.before_commit(pending.step)
        # DCP wrote the metadata after every rank's data: rank 0 may commit without a barrier.
        if self.rank != 0:
            return None
        self._commit(pending.step, pending.path, pending.model_only)
        logger.info("committed checkpoint step %d to %s (%.2fs after the save began)", pending.step, pending.path,
                    time.perf_counter() - pending.started)
        return pending.path

    def _commit(self, step: int, path: str, model_only: bool) -> None:
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        write_commit(path, {"step": step, "world_size": world, "time": time.time(), "model_only": model_only,
                            **self.commit_info})
        self._committed = path
        self._purge_old()

    def take_committed(self) -> str | None:
        """The newest step committed (by this rank: rank 0) since the last call, to report."""
        path, self._committed = self._committed, None
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
            storage.remove(storage.join(path, COMMIT_MARKER))  # uncommit first: never half-deleted yet valid
            storage.rmtree(path)

    # ------------------------------------------------------------------ loading

    def resolve_load_step(self, load_step: int = -1) -> int | None:
        return loadable_step(self.folder, load_step)

    def load(self, step: int) -> None:
        """Restore every state from ``step-N``, resharded to this run's layout.

        A model-only checkpoint (a seed checkpoint) restores the weights alone.
        """
        path = step_dir(self.folder, step)
        self.load_path(path, model_only=read_commit(self.folder, step).get("model_only", False))

    def load_path(self, path: str, model_only: bool) -> None:
        """Restore from a committed step folder anywhere (e.g. ``checkpoint.initial_load_path``),
        except the states named in ``exclude_from_loading``."""
        if not storage.isfile(storage.join(path, COMMIT_MARKER)):
            raise CheckpointError(f"{path} is not a committed checkpoint (no {COMMIT_MARKER} file)")
        names = ["model"] if model_only else list(self.states)
        states = {k: self.states[k] for k in names if k not in self.exclude}
        if not states:
            return
        metadata = check_files(path)
        check_compatible(path, metadata, tensor_shapes(states), self.model_keys)
        try:
            dcp.load(states, checkpoint_id=path, storage_reader=storage.dcp_reader(path), process_group=self.group)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"cannot load checkpoint {path}: {_root_cause(e)}. `python -m raytitan.checkpoints verify {path}` "
                f"names the damaged file and key; delete its {COMMIT_MARKER} file so the run falls back to the "
                "previous step"
            ) from e


@dataclass
class _PendingSave:
    step: int
    path: str
    model_only: bool
    written: Future
    staged: Future | None
    started: float


def _root_cause(e: BaseException) -> str:
    """One line per failing rank instead of DCP's nested tracebacks."""
    if isinstance(e, CheckpointException):
        # Each failure is the exception, or (exception, its stack) in recent torch versions.
        failures = [f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for f in e.failures.values()]
        causes = {_root_cause(f) for f in failures if isinstance(f, BaseException)}
        return "; ".join(sorted(causes)) or str(e).splitlines()[0]
    first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


