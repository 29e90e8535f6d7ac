"""Ranks outside the layout: an elastic world whose size fits no layout fully keeps the global
batch by training on fewer ranks; the rest idle in step with them until the next resize."""

from __future__ import annotations

import logging

import torch.distributed as dist

from raytitan.config.job import JobConfig
from raytitan.config.plan import plan_run
from raytitan.trainer.loop import TrainState

logger = logging.getLogger("raytitan")


def workers_that_train(config: JobConfig, world: int) -> int:
    """How many of ``world`` workers the layout would use (0: it cannot be formed)."""
    try:
        return plan_run(config, world, resolve_data=False).dims.world_size
    except ValueError as e:  # the grow check then says it is not growing to this size
        logger.info("no layout over %d workers (%s): the run would not train on them", world, e)
        return 0


def agree_on_first_step(first: int) -> int:
    """Rank 0's first step, on every rank of the world (the ones that idle included)."""
    shared = [first]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def idle(ctx) -> TrainState:
    """A rank outside the layout: holds no state, and makes the same stop checks, ``report``
    calls and grow checks as the others (Ray requires every worker to report equally often) until
    the run ends, stops or the group resizes. ``ctx``: the rank's ``WorkerContext``."""
    config, plan = ctx.config, ctx.plan
    logger.warning(
        "rank %d idles: %d workers keep the global batch of %d only as %s; it rejoins at the next resize",
        ctx.rank, plan.world_size, plan.global_batch_size, plan.dims.summary,
    )
    first = agree_on_first_step(0)
    for step in range(first, config.training.steps + 1):
        stop = ctx.stop(step)  # in the order the training ranks make these calls
        if ctx.schedule.reports(step):
            ctx.runtime.report({"step": step, "idle": 1}, None)
        if stop and step < config.training.steps:
            return TrainState(step=step)
        if ctx.schedule.boundary(step) and ctx.growth(step):
            return TrainState(step=step)
    return TrainState(step=config.training.steps)
