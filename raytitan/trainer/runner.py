"""ModelRunner: one microbatch in, this rank's loss (and gradients) out, whatever the layout.

Plain and FSDP/TP models run forward and backward directly; pipelined ones hand the batch to
their schedule. Context parallel ranks score only the positions they hold, and a vocab-sharded
output is scored under ``loss_parallel``. With block-causal attention every model part (every
pipeline stage, through the schedule's keyword arguments, split per microbatch like the inputs)
also gets the rows' ``document_ids``. A model with an auxiliary loss (MoE balance) adds it to
the loss before backward. The trainer's loop stays the same for all of them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from raytitan.components.loss import IGNORE_INDEX, cross_entropy_sum
from raytitan.distributed.attention import document_ids
from raytitan.distributed.context import shard_sequence
from raytitan.models.moe import aux_loss


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class PipelineLoss:
    """The loss a pipeline schedule calls per microbatch: summed cross entropy / ``scale``."""

    scale = 1.0

    def __init__(self, loss_fn=cross_entropy_sum):
        self.loss_fn = loss_fn

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels) / self.scale


class ModelRunner:
    def __init__(self, parts: list[torch.nn.Module], *, cp_positions: torch.Tensor | None = None,
                 loss_parallel: bool = False, pipeline=None, eval_pipeline=None,
                 pipeline_loss: PipelineLoss | None = None, is_last_stage: bool = True, loss_fn=cross_entropy_sum,
                 autocast_dtype: torch.dtype | None = None, document_start: int | None = None):
        """``loss_fn``: summed cross entropy of (logits, labels), possibly compiled;
        ``autocast_dtype``: compute dtype when no FSDP applies mixed precision (one rank, TP only);
        ``document_start``: for block-causal attention, the token that begins each packed document
        (BOS); None for causal attention over whole rows."""
        self.parts, self.cp_positions, self.loss_fn = parts, cp_positions, loss_fn
        self.document_start = document_start
        self.autocast_dtype = autocast_dtype
        self.loss_parallel, self.pipeline, self.eval_pipeline = loss_parallel, pipeline, eval_pipeline
        self.pipeline_loss, self.is_last_stage = pipeline_loss, is_last_stage
        self.aux_loss_sum: torch.Tensor | None = None  # since the loop last took it (``take_aux_loss``)

    def take_aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss summed over the microbatches since the last call (None: none)."""
        aux, self.aux_loss_sum = self.aux_loss_sum, None
        return aux

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a [batch, seq] tensor (all of them without context parallel)."""
        return t if self.cp_positions is None else shard_sequence(t, self.cp_positions, dim=1)

    def model_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """This rank's positions of the inputs, and the keyword arguments every model part takes."""
        if self.document_start is None:
            return self.local(inputs), {}
        return self.local(inputs), {"document_ids": self.local(document_ids(inputs, self.document_start))}

    def target_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """How many of the labels this rank scores."""
        return (self.local(labels) != IGNORE_INDEX).sum().to(torch.float32)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, scale: float,
                         sequences: float | None = None) -> torch.Tensor:
        """Backward of (summed loss / scale) plus the model's auxiliary loss, if it has one (MoE
        layers with ``aux_loss_alpha > 0``): a mean over this microbatch's rows, weighed by their
        share of the ``sequences`` of the global batch, so that the microbatches' terms add up to
        the mean over the global batch. Returns the summed loss / scale, detached (zero off the
        last stage); the weighed auxiliary loss is added to ``aux_loss_sum``."""
        (inputs, extra), labels = self.model_inputs(inputs), self.local(labels)
        with self._loss_context():
            if self.pipeline is None:
                with self._autocast(inputs.device):
                    loss = self.loss_fn(self.parts[0](inputs, **extra), labels) / scale
                aux = aux_loss(self.parts[0])
                if aux is None:
                    loss.backward()
                else:
                    aux = aux * (inputs.shape[0] / (sequences or inputs.shape[0]))
                    (loss + aux).backward()
                    self.aux_loss_sum = aux.detach() if self.aux_loss_sum is None else self.aux_loss_sum + aux.detach()
                return _plain(loss.detach())
            with self._autocast(inputs.device):
                return self._pipelined(functools.partial(self.pipeline.step, return_outputs=False), inputs, labels,
                                       scale, extra)

    @torch.no_grad()
    def loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss over this rank's positions, without gradients (zero off the last stage)."""
        (inputs, extra), labels = self.model_inputs(inputs), self.local(labels)
        with self._loss_context():
            with self._autocast(inputs.device):
                if self.pipeline is None:
                    return _plain(self.loss_fn(self.parts[0](inputs, **extra), labels))
                return self._pipelined(self.eval_pipeline.eval, inputs, labels, 1.0, extra)

    def _pipelined(self, run, inputs: torch.Tensor, labels: torch.Tensor, scale: float, extra: dict) -> torch.Tensor:
        """Feed the first stage the inputs, the last the labels and every stage ``extra`` (keyword
        arguments, split into microbatches like the inputs); sum the last stage's losses."""
        self.pipeline_loss.scale = scale
        losses: list[torch.Tensor] = []
        holds_first_stage = self.parts[0].tok_embeddings is not None
        run(*((inputs,) if holds_first_stage else ()), target=labels if self.is_last_stage else None, losses=losses,
            **extra)
        if not losses:
            return torch.zeros((), device=inputs.device)
        return torch.stack([_plain(loss.detach()) for loss in losses]).sum()
