"""Pipeline parallel's runtime: this rank's stages and the ``torch.distributed.pipelining``
schedule that drives them (the layout is planned in ``raytitan.distributed.pipeline``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from raytitan.distributed.pipeline import schedule_name


class Stage(PipelineStage):
    """A ``PipelineStage`` whose shape-inference forward leaves the stage's buffers as they were.

    torch 2.13 learns the shapes sent between stages from one extra forward of each stage at the
    schedule's first step (the first stage on its first microbatch, the others on uninitialized
    tensors), in training mode. A module that keeps state in a buffer as it runs, as an MoE layer
    counts the tokens each expert received for the load-balancing update
    (``raytitan.models.moe.MoE.tokens_per_expert``), would count that forward too: the first
    bias update would differ from one process's. The buffers are copied before and those it changed restored after.

    The override is of a private method, ``PipelineStage._forward_metadata_inference`` (torch
    2.13; tests/parallel/test_pipeline.py checks that torch still calls it)."""

    def _forward_metadata_inference(self, *args, **kwargs):
        saved = [(b, b.detach().clone()) for b in self.submod.buffers()]
        try:
            return super()._forward_metadata_inference(*args, **kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    # Only those the forward changed: a restored buffer the forward saved for the
                    # backward (RoPE's table) would fail the shape-inference backward that follows.
                    if not torch.equal(buffer, value):
                        buffer.copy_(value)


def build_pipeline(parts: list[nn.Module], stage_ids: list[int], stages: int, pp_group, device: torch.device,
                   schedule: str, n_microbatches: int, loss_fn):
    """The schedule that runs this rank's stages. Gradients are not rescaled by the schedule:
    ``loss_fn`` already divides by the global token count."""
    pipeline_stages = [Stage(part, i, stages, device, group=pp_group) for part, i in zip(parts, stage_ids)]
    cls = get_schedule_class(schedule_name(schedule))
    if issubclass(cls, PipelineScheduleMulti):
        return cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
