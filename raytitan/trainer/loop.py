"""The training loop: forward, backward over microbatches, clip, step, log, checkpoint.

Knows nothing of Ray: the caller hands it the built pieces and a ``report`` callback. A step
whose loss or gradient norm is not finite never reaches the optimizer, and weights that are not
finite are never saved (``NonFiniteGuard``; memory snapshots: ``SnapshotFiniteness``).
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
    place if max_norm > 0. Computed also when clipping is off: the non-finite guard reads it."""
    # DTensors on different meshes (expert weights under expert parallel live on their own)
    # cannot be stacked together: one norm per mesh, each reduced, then summed as squares.
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # reduce the shards' partial norms
    total = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
    if pp_group is not None:  # each stage holds different parameters: add the squares
        total = all_reduce_sum(total**2, pp_group).sqrt()
    if max_norm > 0:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm, or the weights about to be saved, were NaN or infinite, and
    the run stopped there: nothing of that step was applied or saved."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def is_finite(*values: torch.Tensor) -> bool:
    """Whether every value is finite, in one read from the device."""
    return bool(torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all().item())


class NonFiniteGuard:
    """What a step whose loss or gradient norm is not finite does (``training.on_nonfinite``):
    "stop" raises ``NonFiniteError``; "skip" drops its update and counts it, up to ``max_skips``
    in a row, and stops at the next one. The loop calls it with global values (reduced over every
    rank and pipeline stage), so every rank takes the same decision without another collective."""

    def __init__(self, policy: str = "stop", max_skips: int = 3):
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0  # steps skipped since this process started
        self.in_a_row = 0

    def applied(self) -> None:
        self.in_a_row = 0

    def not_finite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count a non-finite step whose update was dropped; raise if the run must stop."""
        self.in_a_row += 1
        what = f"step {step}: loss {loss.item():.6g}, gradient norm {grad_norm.item():.6g}"
        if self.policy == "skip" and self.in_a_row <= self.max_skips:
            self.skipped += 1
            logger.warning("%s: not finite, skipped its update (%d in a row, %d in all; training.max_nonfinite_skips "
                           "= %d in a row are skipped, the next one stops the run)", what, self.in_a_row, self.skipped,
                           self.max_skips)
            return
        why = ("training.on_nonfinite = stop" if self.policy == "stop" else
               f"{self.in_a_row} non-finite steps in a row, more than training.max_nonfinite_skips = {self.max_skips}")
        raise NonFiniteError(
            f"{what}: not finite, stopped before its optimizer step ({why}). Nothing of step {step} was applied or "
            "saved: the newest committed checkpoint is the last good state. Lower optimizer.lr (or raise "
            "lr_scheduler.warmup_steps, or look at the data of this step), then run again to resume from it; "
            "training.on_nonfinite = skip drops such steps instead", step)

    def weights(self, step: int, finite: bool) -> None:
        """Before a save: weights that are not finite are never saved, whatever the policy."""
        if not finite:
            raise NonFiniteError(
                f"step {step}: the weights are not finite after this step's update; not saved. The newest committed "
                "checkpoint is the last good state: lower optimizer.lr (or raise lr_scheduler.warmup_steps), then "
                "run again to resume from it", step)


class SnapshotFiniteness:
    """Memory snapshots are not checked by a collective before each one, as disk saves are: each
    rank checks its own part, off the training thread, and never seals one whose weights are not
    finite (``CheckpointManager.nonfinite_step``), so that snapshot never completes. The run must
    then stop on every rank at the same step (the error path waits for all of them), so at each
    snapshot step the ranks post what they found in one all-reduce of one number, without waiting
    for it, and read the answer at the next snapshot step, when it has long arrived: one step or
    two after a rank found it, every rank raises ``NonFiniteError`` for the step that was not saved."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None):
        self.device, self.group = device, group
        self._posted: tuple[dist.Work | None, torch.Tensor] | None = None

    def before_snapshot(self, found: int | None, guard: NonFiniteGuard) -> None:
        """``found``: this rank's first snapshot step whose part was not finite (None: none yet).
        Raises ``NonFiniteError`` where some rank had found one by the previous snapshot step."""
        if self._posted is not None:
            work, agreed = self._posted
            if work is not None:
                work.wait()
            if (bad := int(agreed.item())) > 0:
                guard.weights(bad, False)
        flag = torch.tensor(found or 0, dtype=torch.int64, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True) \
            if dist.is_initialized() else None
        self._posted = (work, flag)


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
    snapshot_interval: int = 0  # memory snapshots (0: never)

    def logs(self, step: int, first_step: int) -> bool:
        return step % self.log_freq == 0 or step in (self.total_steps, first_step, 1)

    def validates(self, step: int) -> bool:
        return self.validation_freq > 0 and (step % self.validation_freq == 0 or step == self.total_steps)

    def saves(self, step: int) -> bool:
        return self.checkpoint_enabled and (step % self.checkpoint_interval == 0 or step == self.total_steps)

    def snapshots(self, step: int) -> bool:
        """Steps that take a memory snapshot: every ``snapshot_interval``, except where a disk
        checkpoint is saved (it holds the same state) and the last step."""
        return self.snapshot_interval > 0 and step % self.snapshot_interval == 0 and not self.saves(step) \
            and step < self.total_steps

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
                 profiler: Profiler | None = None, extra_metrics: dict[str, float] | None = None,
                 guard: NonFiniteGuard | None = None, group: dist.ProcessGroup | None = None,
                 snapshots: CheckpointManager | None = None,
                 model_metrics: Callable[[], dict[str, float]] = lambda: {}):
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
        self.model_metrics = model_metrics  # the family's own, at every logged step (MoE expert load)
        self.params = [p for part in runner.parts for p in part.parameters() if p.requires_grad]
        self.guard = guard or NonFiniteGuard()
        self.group = group  # every rank that trains (None: the default group), for the weights check
        self.snapshots = snapshots  # memory snapshots (``checkpoint.memory_interval``), where the launcher keeps them
        self.snapshot_finiteness = SnapshotFiniteness(device, group)
        self.aux_loss: torch.Tensor | None = None  # the last step's auxiliary loss (MoE balance), if the model has one

    def weights_finite(self) -> bool:
        """Whether every training rank's share of the weights is finite (one all-reduce)."""
        bad = torch.zeros((), device=self.device)
        for p in self.params:
            local = p.to_local() if isinstance(p, DTensor) else p
            bad += (~torch.isfinite(local.detach())).sum()
        if dist.is_initialized():
            dist.all_reduce(bad, group=self.group)
        return bad.item() == 0

    def train_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over this rank's rows, split into microbatches; returns the global
        mean loss and the gradient norm as tensors (read them only where they are logged), and
        whether the update was applied: not when the loss or gradient norm is not finite.

        Each microbatch's summed loss is divided by the *global* target-token count (an
        auxiliary loss, a mean over sequences, is weighed by the microbatch's share of the global
        batch's sequences), and gradients are summed over ranks, so the update is the same however
        the global batch is split across ranks and microbatches. The auxiliary loss of the step
        (global, not in the returned loss) is kept in ``aux_loss`` for the log.
        """
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        counts = torch.stack([self.runner.target_tokens(labels), torch.tensor(float(len(tokens)), device=self.device)])
        global_tokens, global_sequences = all_reduce_sum(counts, self.loss_group)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for mb_inputs, mb_labels in zip(inputs.split(self.local_batch_size), labels.split(self.local_batch_size)):
            loss_sum += self.runner.forward_backward(mb_inputs, mb_labels, global_tokens, global_sequences)
        aux = self.runner.take_aux_loss()  # MoE balance loss, already in the backward (None: none)
        # Summed over data/context ranks; over pipeline stages, of which only the last has a loss.
        sums = all_reduce_sum(loss_sum if aux is None else torch.stack([loss_sum, aux]), self.loss_group, self.pp_group)
        loss, self.aux_loss = (sums, None) if aux is None else (sums[0], sums[1])
        grad_norm = clip_grad_norm_(self.params, self.max_norm, self.pp_group)
        applied = is_finite(loss, grad_norm)  # both global: every rank decides the same
        if applied:
            self.checkpoint.wait_for_staging()  # an async save may still be copying these weights
            if self.snapshots is not None:
                self.snapshots.wait_for_staging()
            self.optimizer.step()
            self.after_optimizer_step()  # e.g. Float8 scales for the next all-gather
        else:
            self.optimizer.zero_grad(set_to_none=True)  # the update is dropped, weights and moments unchanged
        self.lr_scheduler.step()  # step n trains at the lr of step n, skipped steps or not
        return loss, grad_norm, applied

    def fit(self) -> TrainState:
        for part in self.runner.parts:
            part.train()
        try:
            self._run()
        except NonFiniteError:
            self._close()  # an async save of an earlier, good step still commits
            raise
        self._close()
        return self.state

    def _close(self) -> None:
        self.checkpoint.close()
        if self.snapshots is not None:
            self.snapshots.close()
        self.metrics.close()
        if self.profiler is not None:
            self.profiler.close()

    def _run(self) -> None:
        first_step = self.state.step + 1
        while self.state.step < self.schedule.total_steps:
            step = self.state.step + 1
            self.before_step(step)
            lr = self.lr_scheduler.get_last_lr()[0]
            t0 = time.perf_counter()
            batch = self.loader.next_batch()
            data_wait = time.perf_counter() - t0
            tokens = batch.tokens.to(self.device, non_blocking=True)

            loss, grad_norm, applied = self.train_step(tokens)
            if applied:
                self.guard.applied()
            else:  # the batch is consumed and the step counts: the data stream stays exact
                self.guard.not_finite(step, loss, grad_norm)

            self.state.step = step
            step_tokens = self.loader.global_batch_size * (tokens.shape[1] - 1)
            self.state.tokens_seen += step_tokens
            self.metrics.record_step(step_tokens, data_wait)
            self.after_step(step)
            if self.profiler is not None:
                self.profiler.step(step)
            self.checkpoint.poll()  # commits an async save whose write completed
            if self.snapshots is not None:
                self.snapshots.poll()
            # Every rank asks at every step: a signal or the launcher's request ends the run here, saved.
            stop = self.stop_requested(step)

            metrics = None
            if self.schedule.logs(step, first_step) or self.schedule.reports(step):
                metrics = {"step": step, "loss": loss.item()}
            if self.schedule.logs(step, first_step):
                metrics = self.metrics.summarize(step, metrics["loss"], grad_norm.item(), lr)
                metrics.update(tokens_seen=self.state.tokens_seen, **self.extra_metrics)
                metrics["training/skipped_steps"] = self.guard.skipped
                metrics.update(self.loader.metrics())
                metrics.update(self.model_metrics())
                if self.aux_loss is not None:
                    metrics["moe/aux_loss"] = self.aux_loss.item()
                if self.snapshots is not None:  # due while the previous one was still being sent
                    metrics["checkpoint/snapshots_skipped"] = self.snapshots.snapshots_skipped
                    if self.snapshots.snapshot_stalls:  # the newest snapshot's hold on the training thread
                        metrics["checkpoint/snapshot_stall_s"] = self.snapshots.snapshot_stalls[-1]
                self.metrics.log(metrics)
            if self.validator and self.schedule.validates(step):
                validation = {"validation/loss": self.validator.evaluate()}
                self.metrics.log_validation(step, validation)
                metrics.update(validation)
            if self.schedule.saves(step) or (stop and self.schedule.checkpoint_enabled):
                self.guard.weights(step, self.weights_finite())
                if step == self.schedule.total_steps:
                    self.checkpoint.save_last(step)
                else:
                    self.checkpoint.save(step)
            elif self.snapshots is not None and self.schedule.snapshots(step):
                # Each rank checks its own part off the training thread (SnapshotFiniteness).
                self.snapshot_finiteness.before_snapshot(self.snapshots.nonfinite_step, self.guard)
                self.snapshots.save(step)  # copied now, written to the stores in the background
            if self.schedule.reports(step):
                self.metrics.flush()
                self.report(metrics, self.checkpoint.take_committed())
            if stop and step < self.schedule.total_steps:
                self.stopped = stop
                break  # to resume from this step's checkpoint, committed by close()
            if self.schedule.boundary(step) and self.stop_at_boundary(step):
                break  # to resume elsewhere from this step's checkpoint, committed by close()
