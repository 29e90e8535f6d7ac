"""Optimizer and learning-rate schedule (warmup, optional stable phase, decay)."""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}  # optimizer.name (any case)
IMPLEMENTATIONS = ("auto", "foreach", "fused", "for-loop")  # optimizer.implementation
DECAY_TYPES = ("linear", "sqrt", "cosine")  # lr_scheduler.decay_type


class PartOptimizers:
    """One optimizer per model part (pipeline stage), stepped as one.

    Separate optimizers keep each part's state under its own parameter names, which is what lets
    a checkpoint move between layouts with different stage splits. Not a ``torch.optim.Optimizer``
    itself (it holds no parameters): the schedule gives each part's optimizer a ``LambdaLR`` of its
    own (``PartSchedulers``).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: loading a state dict replaces a part's group dicts.
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(parts: list[torch.nn.Module], config, device: torch.device) -> PartOptimizers:
    return PartOptimizers([_build_one(part.parameters(), config, device) for part in parts])


def _build_one(params, config, device: torch.device) -> torch.optim.Optimizer:
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "eps": config.eps,
        "weight_decay": config.weight_decay,
        "fused": impl == "fused",
        "foreach": impl == "foreach",
    }
    cls = {name.lower(): cls for name, cls in OPTIMIZERS.items()}[config.name.lower()]
    return cls(params, **kwargs)


class WarmupStableDecay:
    """LR multiplier at a step: linear warmup, flat, then decay to ``min_lr_factor``.

    ``decay_ratio`` is the share of all steps spent decaying; None decays over every
    step after warmup.
    """

    def __init__(self, warmup_steps: int, total_steps: int, decay_ratio: float | None, decay_type: str,
                 min_lr_factor: float):
        self.warmup = warmup_steps
        decay_steps = total_steps - warmup_steps if decay_ratio is None else round(total_steps * decay_ratio)
        self.decay_start = total_steps - decay_steps
        self.decay_steps = max(decay_steps, 1)
        self.decay_type, self.min_lr_factor = decay_type, min_lr_factor

    def __call__(self, step: int) -> float:
        # LambdaLR calls with the number of completed steps; step s trains with lambda(s).
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step < self.decay_start:
            return 1.0
        progress = min((step - self.decay_start) / self.decay_steps, 1.0)
        if self.decay_type == "linear":
            frac = 1 - progress
        elif self.decay_type == "sqrt":
            frac = 1 - math.sqrt(progress)
        elif self.decay_type == "cosine":
            frac = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"lr_scheduler.decay_type: unknown '{self.decay_type}'")
        return self.min_lr_factor + (1 - self.min_lr_factor) * frac


class PartSchedulers:
    """One ``LambdaLR`` per part optimizer, all on the same schedule, stepped as one."""

    def __init__(self, schedulers: list[LambdaLR]):
        self.schedulers = schedulers

    @property
    def last_epoch(self) -> int:
        return self.schedulers[0].last_epoch

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]


def build_lr_scheduler(optimizer: PartOptimizers | torch.optim.Optimizer, config, total_steps: int) -> PartSchedulers:
    schedule = WarmupStableDecay(config.warmup_steps, total_steps, config.decay_ratio, config.decay_type,
                                 config.min_lr_factor)
    optimizers = optimizer.optimizers if isinstance(optimizer, PartOptimizers) else [optimizer]
    return PartSchedulers([LambdaLR(o, schedule) for o in optimizers])


# torch's warning when a scheduler steps before its optimizer ever has; the step that puts a
# loaded schedule at its position is not a training step, so the order it checks does not apply.
STEP_ORDER_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


class LRSchedulerState:
    """The schedule's position only, for checkpoints: its shape is rebuilt from the config."""

    def __init__(self, scheduler: PartSchedulers):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        # Public API only: one step before the saved position, then step(), which sets every group's
        # lr (this run's base lr x the schedule there) and get_last_lr().
        for s in self.scheduler.schedulers:
            s.last_epoch = int(state["last_epoch"]) - 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=STEP_ORDER_WARNING, category=UserWarning)
                s.step()
