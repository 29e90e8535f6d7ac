"""Pipeline parallel: split the model into stages by layer, place them on the pp ranks, and
drive them with a ``torch.distributed.pipelining`` schedule.

A stage is the model with the blocks of other stages removed; only the first stage keeps the
embedding and only the last the final norm and output head. Parameter names do not change,
so checkpoints move freely between pipelined and unpipelined layouts.

This module plans the layout; ``pipeline_schedule`` builds the stages and the schedule. They are
apart because torch's pipelining loads torch._dynamo (about a second of CPU): the Ray driver plans
every run through this module before it starts Ray, and runs without PP never build a schedule.
"""

from __future__ import annotations

import torch
from torch import nn

# Schedule name -> stages per rank it is built for (when layers_per_stage does not say).
SCHEDULES = {"1F1B": 1, "GPipe": 1, "Interleaved1F1B": 2, "InterleavedZeroBubble": 2, "ZBVZeroBubble": 2}
V_SHAPED = {"ZBVZeroBubble"}  # rank r holds stages r and 2pp-1-r instead of r and r+pp


class PipelineError(ValueError):
    """A pipeline layout that cannot be built; the message names the key to change."""


def schedule_name(name: str) -> str:
    for known in SCHEDULES:
        if known.lower() == name.lower():
            return known
    raise PipelineError(f"parallelism.pipeline_parallel_schedule = {name!r} is not one of {', '.join(SCHEDULES)}")


def num_stages(parallelism, n_layers: int, pp: int) -> int:
    """How many stages the pipeline has, checked against the schedule and the pp degree."""
    name = schedule_name(parallelism.pipeline_parallel_schedule)
    per_stage = parallelism.pipeline_parallel_layers_per_stage
    if per_stage is None:
        stages = pp * SCHEDULES[name]
    else:
        units = n_layers + parallelism.pipeline_parallel_first_stage_less_layers + \
            parallelism.pipeline_parallel_last_stage_less_layers
        if per_stage < 1 or units % per_stage:
            raise PipelineError(
                f"parallelism.pipeline_parallel_layers_per_stage = {per_stage} does not divide {n_layers} layers "
                f"+ first/last stage allowances = {units}")
        stages = units // per_stage
    if stages % pp:
        raise PipelineError(f"{stages} pipeline stages do not divide evenly over pipeline_parallel_degree {pp}")
    per_rank = stages // pp
    if SCHEDULES[name] == 1 and per_rank != 1:
        raise PipelineError(f"schedule {name} runs one stage per rank, but the layout gives {per_rank}; "
                            "pick an interleaved schedule or unset pipeline_parallel_layers_per_stage")
    if SCHEDULES[name] > 1 and per_rank < 2:
        raise PipelineError(f"schedule {name} needs at least 2 stages per rank, the layout gives {per_rank}")
    if name in V_SHAPED and per_rank != 2:
        raise PipelineError(f"schedule {name} needs exactly 2 stages per rank, the layout gives {per_rank}")
    return stages


def stage_layers(n_layers: int, stages: int, first_less: int, last_less: int) -> list[list[int]]:
    """Layer ids of each stage: the layers plus the first/last allowances split evenly, earlier
    stages taking the remainder, then the allowances taken off the first and last stage."""
    units = n_layers + first_less + last_less
    sizes = [units // stages + (1 if s < units % stages else 0) for s in range(stages)]
    sizes[0] -= first_less
    sizes[-1] -= last_less
    if min(sizes) < 1:
        raise PipelineError(
            f"{n_layers} layers cannot fill {stages} pipeline stages (sizes {sizes}): use fewer stages, or lower "
            "pipeline_parallel_first_stage_less_layers / pipeline_parallel_last_stage_less_layers")
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def rank_stages(pp_rank: int, pp: int, stages: int, schedule: str) -> list[int]:
    """Which stage indices rank ``pp_rank`` holds: looped (r, r+pp, ...) or V-shaped."""
    if schedule_name(schedule) in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return list(range(pp_rank, stages, pp))


def keep_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool,
               first_modules: tuple[str, ...] = ("tok_embeddings",),
               last_modules: tuple[str, ...] = ("norm", "output")) -> nn.Module:
    """Turn a whole model (on meta) into one stage of it, in place: drop the other stages' blocks,
    and the modules only the first / last stage holds (``first_modules`` / ``last_modules``)."""
    keep = {str(i) for i in layer_ids}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    for name in (() if first else first_modules) + (() if last else last_modules):
        setattr(model, name, None)
    return model


def microbatches(local_batch_size: int, microbatch_size: int) -> int:
    if microbatch_size < 1 or local_batch_size % microbatch_size:
        raise PipelineError(
            f"parallelism.pipeline_parallel_microbatch_size {microbatch_size} does not divide the local batch "
            f"size {local_batch_size}")
    return local_batch_size // microbatch_size

