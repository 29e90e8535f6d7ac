"""Optimizer and learning-rate schedule (torchtitan's: linear warmup, optional stable phase, decay)."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}  # optimizer.name (any case)
IMPLEMENTATIONS = ("auto", "foreach", "fused", "for-loop")  # optimizer.implementation
DECAY_TYPES = ("linear", "sqrt", "cosine")  # lr_scheduler.decay_type
# training.on_nonfinite: what a step whose loss or gradient norm is NaN or infinite does to the update.
ON_NONFINITE = ("stop", "skip")

logger = logging.getLogger("raytitan")


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
    """torchtitan's learning-rate schedule: the LR multiplier of each step.

    Over ``total_steps`` steps (1-based, n = 1 .. total_steps):

    - warmup: step n <= W trains at n / W of the peak (W = 2: 0.5, then 1.0);
    - stable: 1.0 until the last D steps;
    - decay: step n trains at progress p = (n - (total_steps + 1 - D)) / D, shaped as linear
      1 - p, sqrt 1 - sqrt(p) or cosine (1 + cos(pi p)) / 2, scaled to end at ``min_lr_factor``.
      The schedule reaches p = 1 one step after the last, so the last step does not train at
      the minimum (torchtitan's "virtual last step").

    D is ``round(total_steps * decay_ratio)``, or every step after warmup when ``decay_ratio`` is
    None. Clamped as torchtitan clamps: W longer than the total is cut to the total, and a D that
    would overlap the warmup is cut to ``total_steps - W``. Past ``total_steps`` (a run longer than
    ``lr_scheduler.total_steps``) the multiplier stays at its final value, where torchtitan's
    formula would run past p = 1.
    """

    def __init__(self, warmup_steps: int, total_steps: int, decay_ratio: float | None, decay_type: str,
                 min_lr_factor: float):
        decay_type = decay_type.lower()
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"lr_scheduler.decay_type: unknown '{decay_type}'; use one of {', '.join(DECAY_TYPES)}")
        self.total = total_steps
        self.warmup = min(warmup_steps, total_steps)
        decay = total_steps - self.warmup if decay_ratio is None else round(total_steps * decay_ratio)
        self.decay = min(decay, total_steps - self.warmup)
        self.clamped = []  # what was cut to fit, in words (logged once by build_lr_scheduler)
        if warmup_steps > total_steps:
            self.clamped.append(f"warmup_steps {warmup_steps} > {total_steps} total steps: warmup over {self.warmup}")
        if decay > self.decay:
            self.clamped.append(f"warmup {self.warmup} + decay {decay} steps > {total_steps} total steps: "
                                f"decay over {self.decay}")
        self.decay_type, self.min_lr_factor = decay_type, min_lr_factor

    def __call__(self, completed: int) -> float:
        # LambdaLR passes the number of completed steps; the next step is n = completed + 1.
        n = completed + 1
        if n <= self.warmup:
            return n / self.warmup
        if self.decay == 0:
            return 1.0
        progress = min(max(n - (self.total + 1 - self.decay), 0) / self.decay, 1.0)
        if self.decay_type == "linear":
            frac = 1 - progress
        elif self.decay_type == "sqrt":
            frac = 1 - math.sqrt(progress)
        else:
            frac = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_factor + (1 - self.min_lr_factor) * frac


class PartSchedulers:
    """One ``LambdaLR`` per part optimizer, all on the same schedule, stepped as one."""

    def __init__(self, schedulers: list[LambdaLR]):
        self.schedulers = schedulers

    @property
    def last_epoch(self) -> int:
        return self.schedulers[0].last_epoch

    def step(self) -> None:
        # The schedule follows the step counter, also over steps whose update was skipped (a first
        # step skipped steps the schedule before its optimizer ever stepped: no mistake here).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=STEP_ORDER_WARNING, category=UserWarning)
            for s in self.schedulers:
                s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]


def build_lr_scheduler(optimizer: PartOptimizers | torch.optim.Optimizer, config, total_steps: int) -> PartSchedulers:
    """The ``[lr_scheduler]`` schedule over ``total_steps`` (training.steps), or over
    ``config.total_steps`` when that is set."""
    total = config.total_steps if config.total_steps is not None else total_steps
    schedule = WarmupStableDecay(config.warmup_steps, total, config.decay_ratio, config.decay_type,
                                 config.min_lr_factor)
    for note in schedule.clamped:
        logger.info("lr_scheduler: %s (as torchtitan)", note)
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
