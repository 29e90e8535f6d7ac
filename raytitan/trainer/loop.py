"""The training loop: forward, backward over microbatches, clip, step, log, checkpoint.

Knows nothing of Ray: the caller hands it the built pieces and a ``report`` callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from raytitan.components.checkpoint.manager import CheckpointManager
from raytitan.components.data.loader import BatchLoader
from raytitan.components.metrics import MetricsLogger
from raytitan.components.profiling import Profiler
from raytitan.trainer.runner import ModelRunner

logger = logging.getLogger("raytitan")


@dataclass
class TrainState:
    """Progress counters; a DCP Stateful so it rides along in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


def all_reduce_sum(t: torch.Tensor, *groups: dist.ProcessGroup | None) -> torch.Tensor:
    for group in groups:
        if group is not None:
            dist.all_reduce(t, group=group)
    return t


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Total gradient norm over all ranks' shards (DTensor-aware) and pipeline stages, clipped in
    place if max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # reduce the partial norms of the shards
    if pp_group is not None:  # each stage holds different parameters: add the squares
        total = all_reduce_sum(total**2, pp_group).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


class Validator:
    """Loss on a fixed set of held-out batches: fetched once, then reused every evaluation."""

    def __init__(self, runner: ModelRunner, loader: BatchLoader, steps: int, loss_group: dist.ProcessGroup | None,
                 pp_group: dist.ProcessGroup | None, device: torch.device):
        self.runner, self.loader, self.steps, self.device = runner, loader, steps, device
        self.loss_group, self.pp_group = loss_group, pp_group
        self._batches: list[torch.Tensor] | None = None

    @torch.no_grad()
    def evaluate(self) -> float:
        if self._batches is None:
            self._batches = [self.loader.next_batch().tokens for _ in range(self.steps)]
        for part in self.runner.parts:
            part.eval()
        loss, tokens = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for batch in self._batches:
            batch = batch.to(self.device)
            loss += self.runner.loss_sum(batch[:, :-1], batch[:, 1:])
            tokens += self.runner.target_tokens(batch[:, 1:])
        for part in self.runner.parts:
            part.train()
        all_reduce_sum(loss, self.loss_group, self.pp_group)  # only the last stage has a loss
        all_reduce_sum(tokens, self.loss_group)
        return (loss / tokens).item()


@dataclass(frozen=True)
class Schedule:
    """Which steps log, validate and checkpoint: a pure function of the step, so ranks that
    idle in an elastic world can make the same number of ``report`` calls as the others."""

    total_steps: int
    log_freq: int
    checkpoint_interval: int  # 0: never (the last step still saves when checkpoints are on)
    checkpoint_enabled: bool
    validation_freq: int  # 0: never

    def logs(self, step: int, first_step: int) -> bool:
        return step % self.log_freq == 0 or step in (self.total_steps, first_step, 1)

    def validates(self, step: int) -> bool:
        return self.validation_freq > 0 and (step % self.validation_freq == 0 or step == self.total_steps)

    def saves(self, step: int) -> bool:
        return self.checkpoint_enabled and (step % self.checkpoint_interval == 0 or step == self.total_steps)

    def boundary(self, step: int) -> bool:
        """A checkpoint step before the last: where the group may stop to come back larger."""
        return self.saves(step) and step < self.total_steps

    def reports(self, step: int) -> bool:
        """Steps that report to the launcher: checkpoints, validations and the last step. Not every
        logged step: through Ray a report is a barrier over all workers (about a second each on a
        small machine), and metrics already reach the log, metrics.jsonl and TensorBoard."""
        return self.validates(step) or self.saves(step) or step == self.total_steps


class Trainer:
    """The loop over steps, with every part it needs built by ``raytitan.trainer.build``."""

    def __init__(self, runner: ModelRunner, optimizer, lr_scheduler, loader: BatchLoader,
                 checkpoint: CheckpointManager, metrics: MetricsLogger, state: TrainState, *, device: torch.device,
                 local_batch_size: int, schedule: Schedule, max_norm: float,
                 loss_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None = None,
                 validator: Validator | None = None,
                 report: Callable[[dict, str | None], None] = lambda metrics, checkpoint_dir: None,
                 before_step: Callable[[int], None] = lambda step: None,
                 after_step: Callable[[int], None] = lambda step: None,
                 after_optimizer_step: Callable[[], None] = lambda: None,
                 stop_at_boundary: Callable[[int], bool] = lambda step: False,
                 stop_requested: Callable[[int], str | None] = lambda step: None,
                 profiler: Profiler | None = None, extra_metrics: dict[str, float] | None = None):
        self.runner, self.optimizer, self.lr_scheduler = runner, optimizer, lr_scheduler
        self.loader, self.checkpoint, self.metrics, self.state = loader, checkpoint, metrics, state
        self.device, self.local_batch_size = device, local_batch_size
        self.schedule, self.max_norm = schedule, max_norm
        self.loss_group, self.pp_group = loss_group, pp_group
        self.report, self.validator = report, validator
        self.before_step, self.after_step, self.after_optimizer_step = before_step, after_step, after_optimizer_step
        self.stop_at_boundary, self.stop_requested, self.profiler = stop_at_boundary, stop_requested, profiler
        self.stopped: str | None = None  # why the run stopped short of total_steps on request
        self.extra_metrics = extra_metrics or {}
        self.params = [p for part in runner.parts for p in part.parameters() if p.requires_grad]

    def train_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's rows, split into microbatches; returns the global
        mean loss and the gradient norm as tensors (read them only where they are logged).

        Each microbatch's summed loss is divided by the *global* target-token count, and
        gradients are summed over ranks, so the update is the same however the global
        batch is split across ranks and microbatches.
        """
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        global_tokens = all_reduce_sum(self.runner.target_tokens(labels), self.loss_group)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for mb_inputs, mb_labels in zip(inputs.split(self.local_batch_size), labels.split(self.local_batch_size)):
            loss_sum += self.runner.forward_backward(mb_inputs, mb_labels, global_tokens)
        grad_norm = clip_grad_norm_(self.params, self.max_norm, self.pp_group)
        self.checkpoint.wait_for_staging()  # an async save may still be copying these weights
        self.optimizer.step()
        self.after_optimizer_step()  # e.g. Float8 scales for the next all-gather
        self.lr_scheduler.step()
        # Summed over data/context ranks; over pipeline stages, of which only the last has a loss.
        return all_reduce_sum(loss_sum, self.loss_group, self.pp_group), grad_norm

    def fit(self) -> TrainState:
        for part in self.runner.parts:
            part.train()
        first_step = self.state.step + 1
        while self.state.step < self.schedule.total_steps:
            step = self.state.step + 1
            self.before_step(step)
            lr = self.lr_scheduler.get_last_lr()[0]
            t0 = time.perf_counter()
            batch = self.loader.next_batch()
            data_wait = time.perf_counter() - t0
            tokens = batch.tokens.to(self.device, non_blocking=True)

            loss, grad_norm = self.train_step(tokens)

            self.state.step = step
            step_tokens = self.loader.global_batch_size * (tokens.shape[1] - 1)
            self.state.tokens_seen += step_tokens
            self.metrics.record_step(step_tokens, data_wait)
            self.after_step(step)
            if self.profiler is not None:
                self.profiler.step(step)
            self.checkpoint.poll()  # commits an async save whose write completed
            # Every rank asks at every step: a signal or the launcher's request ends the run here, saved.
            stop = self.stop_requested(step)

            metrics = None
            if self.schedule.logs(step, first_step) or self.schedule.reports(step):
                metrics = {"step": step, "loss": loss.item()}
            if self.schedule.logs(step, first_step):
                metrics = self.metrics.summarize(step, metrics["loss"], grad_norm.item(), lr)
                metrics.update(tokens_seen=self.state.tokens_seen, **self.extra_metrics)
                metrics["data/bad_records"] = self.loader.bad_records
                self.metrics.log(metrics)
            if self.validator and self.schedule.validates(step):
                validation = {"validation/loss": self.validator.evaluate()}
                self.metrics.log_validation(step, validation)
                metrics.update(validation)
            if self.schedule.saves(step) or (stop and self.schedule.checkpoint_enabled):
                if step == self.schedule.total_steps:
                    self.checkpoint.save_last(step)
                else:
                    self.checkpoint.save(step)
            if self.schedule.reports(step):
                self.metrics.flush()
                self.report(metrics, self.checkpoint.take_committed())
            if stop and step < self.schedule.total_steps:
                self.stopped = stop
                break  # to resume from this step's checkpoint, committed by close()
            if self.schedule.boundary(step) and self.stop_at_boundary(step):
                break  # to resume elsewhere from this step's checkpoint, committed by close()
        self.checkpoint.close()
        self.metrics.close()
        if self.profiler is not None:
            self.profiler.close()
        return self.state
