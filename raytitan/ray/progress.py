"""A progress bar on the driver, for terminals and notebooks.

Workers log concise lines (the right thing in a job's log); where a person watches, the driver
also follows the run folder's ``progress.json`` and ``metrics.jsonl`` and draws a tqdm bar.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading

from raytitan.components import storage
from raytitan.components.metrics import METRICS_FILE
from raytitan.trainer.elastic.history import ProgressMarkerError, read_progress

logger = logging.getLogger(__name__)


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
        self._warned: set[str] = set()  # problems already logged: once each, not every second
        self.bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True)
        self._metrics_offset = self._metrics_size()  # only this run's lines, not an earlier run's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="raytitan-progress")
        self._thread.start()

    def _warn_once(self, kind: str, message: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message, *args)

    def _metrics_size(self) -> int:
        path = storage.join(self.run_dir, METRICS_FILE)
        try:
            return max(0, storage.size(path))
        except OSError as e:
            self._warn_once("metrics size", "progress bar: cannot size %s (%s); the loss it shows may be an "
                            "earlier run's at first", path, e)
            return 0

    def _latest_loss(self) -> float | None:
        """The newest logged loss since the last look."""
        loss = None
        path = storage.join(self.run_dir, METRICS_FILE)
        try:
            new = storage.read_from(path, self._metrics_offset)
        except OSError as e:  # tried again at the next look
            self._warn_once("metrics read", "progress bar: cannot read %s (%s); the loss it shows may lag", path, e)
            return None
        for line in new.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # being written: read it next time
            self._metrics_offset += len(line)
            try:
                record = json.loads(line)
            except ValueError as e:
                self._warn_once("metrics line", "progress bar: skipping a line of %s that is not JSON (%s)", path, e)
                continue
            if isinstance(record, dict):
                loss = record.get("loss", loss)
        return loss

    def update(self) -> None:
        try:
            progress = read_progress(self.run_dir)
        except ProgressMarkerError as e:
            self._warn_once("marker", "progress bar: %s; the bar stays at step %d until the marker is written again",
                            e, self.bar.n)
            progress = None
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
