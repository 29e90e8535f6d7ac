"""Where checkpoints live and which of them count, with no training machinery.

Layout: ``{folder}/step-N/`` holds the DCP files; ``step-N/COMMITTED`` is written by rank 0
only after every rank finished writing. Only committed steps exist as far as loading is
concerned, so a crash mid-save leaves the previous step as the newest; a committed step whose
files or marker were damaged later is skipped with a warning (bytes damaged at the right length
are found by their checksums while loading: ``integrity``). Tools that read checkpoints offline
(``raytitan.checkpoints``, ``raytitan.convert``, sampling) need only this module.
"""

from __future__ import annotations

import json
import logging
import re

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from raytitan.components import storage
from raytitan.components.checkpoint import dcp_files

logger = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and what to do."""

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


def newest_readable_step(folder: str) -> int | None:
    """The newest committed step whose commit marker reads, for messages that name where a run
    stands (a garbled marker marks a damaged step; data files are checked when a step loads)."""
    for step in reversed(committed_steps(folder)):
        try:
            read_commit(folder, step)
        except (CheckpointError, OSError):
            continue
        return step
    return None


def read_commit(folder: str, step: int) -> dict:
    return read_commit_at(step_dir(folder, step))


def read_commit_at(path: str) -> dict:
    """A step's commit marker; an empty or garbled one (a torn write, a damaged disk) is a
    ``CheckpointError`` naming it, so that the step counts as damaged."""
    file = storage.join(path, COMMIT_MARKER)
    text = storage.read_text(file)
    try:
        marker = json.loads(text)
    except ValueError as e:  # also UnicodeDecodeError
        what = "empty" if not text.strip() else f"not valid JSON ({e})"
        raise CheckpointError(f"the commit marker {file} is {what}: the step is damaged; delete the step "
                              "folder (a run resumes from the newest intact step without it)") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"the commit marker {file} is not a JSON object (it holds a {type(marker).__name__}): "
                              "the step is damaged; delete the step folder")
    return marker


def write_commit(path: str, marker: dict) -> None:
    """Mark a fully written step folder as usable (atomically)."""
    storage.write_text(storage.join(path, COMMIT_MARKER), json.dumps(marker))


def read_metadata(path: str) -> Metadata:
    try:
        return dcp_files.reader(path).read_metadata()
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


def is_export(folder: str, step: int) -> bool:
    """A committed step after the start that holds model weights only (``last_save_model_only``):
    weights to take away, not a state a run can resume from (a step-0 seed is a run's origin)."""
    return step > 0 and read_commit(folder, step).get("model_only", False)


def loadable_step(folder: str, load_step: int = -1, damaged: dict[int, str] | None = None) -> int | None:
    """The step to resume from: ``load_step`` if given (it must be committed and intact), else the
    newest committed step whose marker is readable and whose files are intact. Damaged newer steps
    are skipped with a warning, and so are weights-only exports (they lack the optimizer, schedule
    and data position). ``damaged``: steps already found damaged (failed checksums while loading),
    step -> why, skipped too.

    Depends only on what is on storage, so every rank (also one that idles) picks the same step."""
    steps = committed_steps(folder)
    damaged = damaged or {}
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
    problems, exports = list(damaged.values()), []
    for step in reversed(steps):
        if step in damaged:
            continue
        try:
            if is_export(folder, step):
                exports.append(step)
                continue
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
    done = [s for s in committed_steps(folder) if s >= total_steps and is_intact_export(folder, s)]
    return max(done) if done else None


def is_intact_export(folder: str, step: int) -> bool:
    """``is_export``, False for a step whose marker is damaged (resuming skips it with a warning)."""
    try:
        return is_export(folder, step)
    except CheckpointError:
        return False


def _export_advice(folder: str, step: int) -> str:
    return (f"{step_dir(folder, step)} holds model weights only (checkpoint.last_save_model_only), not the "
            "optimizer, schedule and data position a resume needs. To train on from those weights, start a new "
            f"run (another ray.name) with checkpoint.initial_load_path = {step_dir(folder, step)}")



def root_cause(e: BaseException) -> str:
    """One line per failing rank instead of DCP's nested tracebacks."""
    if isinstance(e, CheckpointException):
        # Each failure is the exception, or (exception, its stack) in recent torch versions.
        failures = [f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for f in e.failures.values()]
        causes = {root_cause(f) for f in failures if isinstance(f, BaseException)}
        return "; ".join(sorted(causes)) or str(e).splitlines()[0]
    first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"
