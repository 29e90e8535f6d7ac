"""A progress bar on the driver, for terminals and notebooks.

Workers log concise lines (the right thing in a job's log); where a person watches, the driver
also follows the run folder's ``progress.json`` and ``metrics.jsonl`` and draws a tqdm bar.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading

from raytitan.components import storage
from raytitan.components.metrics import METRICS_FILE
from raytitan.trainer.elastic.history import read_progress


def wanted(setting: str) -> bool:
    """``metrics.progress_bar``: on, off, or auto (a terminal or a notebook is watching)."""
    if setting != "auto":
        return setting == "on"
    return sys.stdout.isatty() or "ipykernel" in sys.modules


class ProgressBar:
    """Follows a run folder from a background thread until ``close``."""

    def __init__(self, run_dir: str, total_steps: int, interval_s: float = 1.0):
        if importlib.util.find_spec("ipywidgets"):  # a notebook widget bar needs it
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm

        self.run_dir, self.interval_s = run_dir, interval_s
        self.bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True)
        self._metrics_offset = self._metrics_size()  # only this run's lines, not an earlier run's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="raytitan-progress")
        self._thread.start()

    def _metrics_size(self) -> int:
        try:
            return max(0, storage.size(storage.join(self.run_dir, METRICS_FILE)))
        except OSError:
            return 0

    def _latest_loss(self) -> float | None:
        """The newest logged loss since the last look."""
        loss = None
        try:
            new = storage.read_from(storage.join(self.run_dir, METRICS_FILE), self._metrics_offset)
            for line in new.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # being written: read it next time
                self._metrics_offset += len(line)
                loss = json.loads(line).get("loss", loss)
        except (OSError, ValueError):
            pass
        return loss

    def update(self) -> None:
        progress = read_progress(self.run_dir)
        if progress and progress["step"] != self.bar.n:
            self.bar.n = progress["step"]  # may go back after a restart from a checkpoint
        loss = self._latest_loss()
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.update()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.update()
        self.bar.close()
