"""The run's history of (re)starts: why, on which world size, from which step, and what it cost.

Rank 0 appends one line per worker-group start to ``{run_dir}/restarts.jsonl``, and keeps
``progress.json`` (the newest completed step) current, so the next start can tell how many
steps of work were lost and how long recovery took.
"""

from __future__ import annotations

import json
import logging
import time

from raytitan.components import storage
from raytitan.components.checkpoint.layout import read_commit
from raytitan.trainer.elastic.fault import injected_faults
from raytitan.trainer.elastic.growth import GrowRequestError, read_grow_request
from raytitan.components.metrics import read_jsonl

logger = logging.getLogger(__name__)

RESTARTS_FILE = "restarts.jsonl"
PROGRESS_FILE = "progress.json"


def read_starts(run_dir: str) -> list[dict]:
    return read_jsonl(storage.join(run_dir, RESTARTS_FILE))


def write_progress(run_dir: str, step: int, stopped: str | None = None) -> None:
    """``stopped``: why the run stopped at ``step`` on request (its checkpoint committed)."""
    marker = {"step": step, "time": time.time(), **({"stopped": stopped} if stopped else {})}
    storage.write_text(storage.join(run_dir, PROGRESS_FILE), json.dumps(marker))


class ProgressMarkerError(RuntimeError):
    """A progress marker that exists but cannot be read or understood; the message names it."""


def read_progress(run_dir: str) -> dict | None:
    """The newest completed step (``{"step", "time"}``, and ``"stopped"``: why, after a stop on
    request); None if no step was marked yet. Raises ProgressMarkerError, naming the file, if it
    exists but cannot be read or parsed."""
    path = storage.join(run_dir, PROGRESS_FILE)
    if not storage.isfile(path):
        return None
    try:
        marker = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ProgressMarkerError(f"progress marker {path} cannot be read ({type(e).__name__}: {e})") from e
    if not (isinstance(marker, dict) and isinstance(marker.get("step"), int)
            and isinstance(marker.get("time"), (int, float))):
        raise ProgressMarkerError(f"progress marker {path} is not one (a step and a time): {marker!r:.200}")
    return marker


def _grew_before(run_dir: str, previous: list[dict], attempt: str | None) -> dict | None:
    """The grow request the previous start's group left, if this start follows it: made by the
    previous start's attempt, and not by this one (a restart within the attempt that grew is no
    growth). Attempt ids, not times: the two groups' clocks may be different machines'."""
    try:
        grow = read_grow_request(run_dir)
    except GrowRequestError as e:
        logger.warning("%s; this start's restart record cannot tell whether the previous group stopped to grow, "
                       "and names another cause", e)
        return None
    made_by = grow.get("attempt") if grow else None
    if made_by is None or not previous or previous[-1].get("attempt") != made_by or made_by == attempt:
        return None
    return grow


def record_start(run_dir: str, checkpoint_folder: str, *, started_at: float, world: int, active: int, dp: int,
                 local_batch: int, accumulation: int, resumed_step: int | None, target_steps: int,
                 timings: dict, attempt: str | None = None, resumed_from: str | None = None) -> dict:
    """Append this start to the history and log it; returns the record. ``attempt``: the
    launcher's id for the attempt this start belongs to (None where no launcher gave one)."""
    previous = read_starts(run_dir)
    try:
        progress, unreadable = read_progress(run_dir), None
    except ProgressMarkerError as e:
        progress, unreadable = None, e
    last_start = previous[-1]["time"] if previous else 0.0
    faults = [f for f in injected_faults(run_dir) if f["time"] > last_start]
    resumed = resumed_step or 0
    grow = _grew_before(run_dir, previous, attempt)
    counts_lost = bool(previous or faults)
    if unreadable and counts_lost:
        logger.warning("%s: lost steps unknown for this start's restart record (and its cause, unless growth or "
                       "an injected fault explains it)", unreadable)
    if grow:
        cause = f"grew after the checkpoint of step {grow['step']}: capacity for {grow['target'] - grow['world']} more workers"
        failed_at = None
    elif faults:
        f = faults[-1]
        cause = f"injected fault: rank {f['rank']} killed {f['when']}"
        failed_at = f["time"]
    elif previous and unreadable:
        cause = f"unknown: the progress marker is unreadable, so whether the previous start finished cannot be told ({unreadable})"
        failed_at = None
    elif previous and progress and progress.get("stopped") and progress["step"] < previous[-1]["target_steps"]:
        cause = f"stopped on request ({progress['stopped']}) after step {progress['step']}, run again"
        failed_at = None
    elif previous and progress and progress["step"] < previous[-1]["target_steps"]:  # it did not finish
        cause = "worker group restarted (a worker or node was lost, or capacity changed: see Ray's log)"
        failed_at = progress["time"]
    elif resumed:
        cause = "run started again on existing storage"
        failed_at = None
    else:
        cause = "first start"
        failed_at = None
    old_world = previous[-1]["world"] if previous else (
        read_commit(checkpoint_folder, resumed_step).get("world_size") if resumed_step and resumed_from != "memory" else None)
    record = {
        "time": started_at,
        "cause": cause,
        "old_world": old_world,
        "world": world,
        "active": active,
        "dp": dp,
        "local_batch": local_batch,
        "accumulation": accumulation,
        "resumed_step": resumed,
        "resumed_from": resumed_from,  # "memory" (a memory snapshot), "disk", or None (nothing to resume)
        "target_steps": target_steps,
        # None: unknown (the progress marker could not be read), not zero.
        "lost_steps": (None if unreadable else max(0, (progress or {}).get("step", resumed) - resumed)) if counts_lost else 0,
        "seconds_since_failure": round(started_at - failed_at, 3) if failed_at else None,
        "seconds_since_grow_stop": round(started_at - grow["time"], 3) if grow else None,
        "timings": timings,
        "attempt": attempt,
    }
    storage.append_text(storage.join(run_dir, RESTARTS_FILE), json.dumps(record) + "\n")
    if previous or resumed:
        logger.warning(
            "restart #%d: %s | world %s -> %d (%d active, dp %d, local %d x accumulation %d) | resumed at step %d, "
            "%s steps lost | %s",
            len(previous), cause, old_world, world, active, dp, local_batch, accumulation, resumed,
            "?" if record["lost_steps"] is None else record["lost_steps"],
            ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        )
    return record


def failures_in(run_dir: str, attempts: set[str]) -> int:
    """Starts of the launcher's ``attempts`` that followed a failure (not first starts,
    resubmissions or growth). By attempt id: the starts' times are the workers' clocks."""
    return sum(1 for s in read_starts(run_dir)
               if s.get("attempt") in attempts and s["seconds_since_failure"] is not None)


def restart_metrics(run_dir: str) -> dict[str, float]:
    starts = read_starts(run_dir)
    return {"elastic/restarts": float(max(0, len(starts) - 1)),
            # Starts whose count is unknown (an unreadable progress marker) add nothing.
            "elastic/lost_steps": float(sum(s["lost_steps"] or 0 for s in starts))}
