"""Fault injection for tests and drills: SIGKILL one worker at a chosen (or seeded) step, once.

A marker file in the run folder records each injected fault (with its time, which the
recovery benchmark reads), so the restarted group does not kill itself again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time

from raytitan.components import storage
logger = logging.getLogger(__name__)


class FaultInjector:
    def __init__(self, fault_config, run_dir: str, rank: int, world_size: int, total_steps: int):
        self.step, self.rank = fault_config.kill_step, fault_config.kill_rank
        self.during_save, self.during_snapshot = fault_config.during_save, fault_config.during_snapshot
        if fault_config.seed >= 0 and total_steps > 1:
            rng = random.Random(fault_config.seed)
            self.step, self.rank = rng.randint(2, total_steps), rng.randrange(world_size)
        self.my_rank = rank
        # One marker per step, whichever rank: a seeded rank is drawn from this start's world size,
        # so a smaller restarted group would draw another rank and kill it again without it.
        self.marker = storage.join(run_dir, "faults", f"step-{self.step}.json")

    @property
    def armed(self) -> bool:
        return self.step > 0 and self.my_rank == self.rank and not storage.isfile(self.marker)

    def before_step(self, step: int) -> None:
        if not (self.during_save or self.during_snapshot) and step == self.step and self.armed:
            self._kill(f"at the start of step {step}")

    def before_commit(self, step: int) -> None:
        if self.during_save and step == self.step and self.armed:
            self._kill(f"during the save of step {step}, before its commit")

    def before_snapshot_commit(self, step: int) -> None:
        if self.during_snapshot and step == self.step and self.armed:
            self._kill(f"during the memory snapshot of step {step}, before its commit")

    def _kill(self, when: str) -> None:
        storage.makedirs(self.marker.rsplit("/", 1)[0])
        storage.write_text(self.marker, json.dumps({"step": self.step, "rank": self.rank, "when": when,
                                                     "time": time.time()}))
        logger.warning("fault injection: killing rank %d %s", self.my_rank, when)
        os.kill(os.getpid(), signal.SIGKILL)


def injected_faults(run_dir: str) -> list[dict]:
    """Faults injected so far in this run, oldest first."""
    folder = storage.join(run_dir, "faults")
    faults = [json.loads(storage.read_text(storage.join(folder, name))) for name in storage.listdir(folder)]
    return sorted(faults, key=lambda f: f["time"])
