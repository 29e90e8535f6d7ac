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
from raytitan.trainer.elastic.growth import read_grow_request
from raytitan.components.metrics import read_jsonl

logger = logging.getLogger(__name__)

RESTARTS_FILE = "restarts.jsonl"
PROGRESS_FILE = "progress.json"


def read_starts(run_dir: str) -> list[dict]:
    return read_jsonl(storage.join(run_dir, RESTARTS_FILE))


def write_progress(run_dir: str, step: int) -> None:
    storage.write_text(storage.join(run_dir, PROGRESS_FILE), json.dumps({"step": step, "time": time.time()}))


def read_progress(run_dir: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(run_dir, PROGRESS_FILE)))
    except (OSError, ValueError):
        return None


def record_start(run_dir: str, checkpoint_folder: str, *, started_at: float, world: int, active: int, dp: int,
                 local_batch: int, accumulation: int, resumed_step: int | None, target_steps: int,
                 timings: dict) -> dict:
    """Append this start to the history and log it; returns the record."""
    previous = read_starts(run_dir)
    progress = read_progress(run_dir)
    last_start = previous[-1]["time"] if previous else 0.0
    faults = [f for f in injected_faults(run_dir) if f["time"] > last_start]
    resumed = resumed_step or 0
    grow = read_grow_request(run_dir, since=last_start)
    if grow:
        cause = f"grew after the checkpoint of step {grow['step']}: capacity for {grow['target'] - grow['world']} more workers"
        failed_at = None
    elif faults:
        f = faults[-1]
        cause = f"injected fault: rank {f['rank']} killed {f['when']}"
        failed_at = f["time"]
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
        read_commit(checkpoint_folder, resumed_step).get("world_size") if resumed_step else None)
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
        "target_steps": target_steps,
        "lost_steps": max(0, (progress or {}).get("step", resumed) - resumed) if previous or faults else 0,
        "seconds_since_failure": round(started_at - failed_at, 3) if failed_at else None,
        "seconds_since_grow_stop": round(started_at - grow["time"], 3) if grow else None,
        "timings": timings,
    }
    storage.append_text(storage.join(run_dir, RESTARTS_FILE), json.dumps(record) + "\n")
    if previous or resumed:
        logger.warning(
            "restart #%d: %s | world %s -> %d (%d active, dp %d, local %d x accumulation %d) | resumed at step %d, "
            "%d steps lost | %s",
            len(previous), cause, old_world, world, active, dp, local_batch, accumulation, resumed,
            record["lost_steps"], ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        )
    return record


def failures_since(run_dir: str, since: float) -> int:
    """Starts after ``since`` that followed a failure (not first starts, resubmissions or growth)."""
    return sum(1 for s in read_starts(run_dir) if s["time"] >= since and s["seconds_since_failure"] is not None)


def restart_metrics(run_dir: str) -> dict[str, float]:
    starts = read_starts(run_dir)
    return {"elastic/restarts": float(max(0, len(starts) - 1)),
            "elastic/lost_steps": float(sum(s["lost_steps"] for s in starts))}
