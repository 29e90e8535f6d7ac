"""Growing back at a checkpoint boundary.

When capacity returns, restarting the worker group at once would throw away the steps since the
last checkpoint. Instead, at each checkpoint step (at most every ``ray.resize_check_interval_s``)
rank 0 asks the launcher how many more workers it could place now. If more workers would also
train (not just idle outside the layout), every rank stops right after that checkpoint is
committed, rank 0 leaves a grow request in the run folder, and the launcher starts the group
again at the larger size: nothing is redone.

The request names the launcher's attempt that made it (an id the launcher hands the workers),
so telling this attempt's request from an earlier one compares no clocks across machines.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from raytitan.components import storage
logger = logging.getLogger(__name__)

GROW_FILE = "grow.json"
# A rank may wait in this group's collectives for a step, a save or (idle ranks) a validation.
CONTROL_TIMEOUT = timedelta(days=7)


def new_control_group() -> dist.ProcessGroup:
    """A CPU group over the whole world (idle ranks included) for the decisions every rank takes
    together: whether to stop (every step, ``raytitan.trainer.elastic.stop``) and whether to grow
    (at checkpoints). On CPU, off the training path even where training runs on NCCL."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


class GrowthCheck:
    """Called by every rank at every checkpoint step; True on all of them when the group should
    stop after this step's checkpoint to come back larger.

    ``spare_workers(n)``: how many of ``n`` more workers the launcher could place now.
    ``trained_by(world)``: how many of ``world`` workers would train (the rest idle).
    """

    def __init__(self, group: dist.ProcessGroup | None, world: int, max_world: int, interval_s: float,
                 spare_workers: Callable[[int], int], trained_by: Callable[[int], int]):
        self.group, self.world, self.max_world, self.interval_s = group, world, max_world, interval_s
        self.spare_workers, self.trained_by = spare_workers, trained_by
        self.last_check = time.monotonic()  # the group was just placed as large as possible
        self.target: int | None = None

    def __call__(self, step: int) -> bool:
        if self.world >= self.max_world:
            return False  # the same on every rank: no collective (and no group) needed
        decision = [self._decide(step) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(decision, src=0, group=self.group)
        self.target = decision[0]
        return self.target is not None

    def _decide(self, step: int) -> int | None:
        if time.monotonic() - self.last_check < self.interval_s:
            return None
        self.last_check = time.monotonic()
        spare = self.spare_workers(self.max_world - self.world)
        if not spare:
            return None
        target = self.world + spare
        now, then = self.trained_by(self.world), self.trained_by(target)
        if then <= now:
            logger.info("capacity for %d more workers, but %d workers would train no more ranks than %d (%d): "
                        "not growing", spare, target, self.world, now)
            return None
        logger.warning("capacity for %d more workers: stopping after the checkpoint of step %d to grow %d -> %d",
                       spare, step, self.world, target)
        return target


class GrowRequestError(RuntimeError):
    """A grow request file that exists but cannot be read or understood; the message names it."""


def request_grow(run_dir: str, step: int, world: int, target: int, attempt: str | None = None) -> None:
    """Leave the request for the launcher (and the cause for the next start's log). ``attempt``:
    the launcher's id for the attempt this group belongs to (None where no launcher gave one)."""
    storage.write_text(storage.join(run_dir, GROW_FILE), json.dumps(
        {"step": step, "world": world, "target": target, "attempt": attempt, "time": time.time()}))


def read_grow_request(run_dir: str, attempt: str | None = None) -> dict | None:
    """The grow request in the run folder, if there is one; with ``attempt``, only a request that
    attempt made (an earlier attempt's request stays for the restart history, and is stale here).

    Raises GrowRequestError, naming the file, if it exists but cannot be read or parsed."""
    path = storage.join(run_dir, GROW_FILE)
    if not storage.isfile(path):
        return None
    try:
        request = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise GrowRequestError(f"grow request {path} cannot be read ({type(e).__name__}: {e})") from e
    missing = [k for k in ("step", "world", "target") if not isinstance(request, dict) or k not in request]
    if missing:
        raise GrowRequestError(f"grow request {path} is not one: {request!r:.200} lacks {', '.join(missing)}")
    if attempt is not None and request.get("attempt") != attempt:
        return None
    return request
