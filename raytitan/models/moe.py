"""A Mixture-of-Experts feed-forward layer for the MoE families (DeepSeek-V3, Qwen3-MoE).

Token-choice top-k routing (softmax or sigmoid scores, optional group-limited routing,
normalization of the chosen scores and a routed scaling factor), routed SwiGLU experts stored as
stacked weights and computed with one grouped matrix multiplication, shared experts, and load
balancing without an auxiliary loss (a per-expert bias that only chooses experts), with an
optional sequence-level auxiliary loss. No token is dropped. On one rank every expert is local;
expert parallel (``raytitan.distributed.expert_parallel``) splits the experts over ranks and moves
tokens to them by all-to-all around ``GroupedExperts.forward``, leaving this module's code the
single-rank reference.

How a trainer uses it:
- after each optimizer step, ``update_load_balance_bias(model)`` moves every layer's bias toward
  balance from the tokens its experts received since the last update (all microbatches), then
  resets the counts. Under data parallel pass the data-parallel group so that every rank counts
  the same tokens and keeps the same bias.
- at each logged step, ``moe_metrics(parts)`` (a family spec's ``metrics`` hook) turns the global
  counts those updates saw since the last log into per-layer load metrics, and warns once per
  layer when routing collapses onto one expert (``collapse_threshold``).
- with ``aux_loss_alpha > 0`` each ``MoE`` keeps the auxiliary loss of its last training forward
  in ``aux_loss``; ``aux_loss(model)`` sums them, to be added to the training loss of that
  microbatch before ``backward`` (scaled as the loss is).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from raytitan.models.llama3.model import FeedForward

logger = logging.getLogger("raytitan")

SCORE_FUNCS = ("softmax", "sigmoid")
# Routing collapse is warned about after this many logged steps in a row above the threshold.
COLLAPSE_LOGGED_STEPS = 3


@dataclass(frozen=True)
class MoEArgs:
    """The shape and routing of one MoE layer.

    ``n_expert_groups`` > 1 turns on group-limited routing (DeepSeek-V3): each token keeps the
    ``n_limited_groups`` groups whose two best scores sum highest and chooses its ``top_k``
    experts within them. ``load_balance_coeff`` None: no bias (selection by scores alone)."""

    dim: int
    moe_inter_dim: int
    num_experts: int = 8
    top_k: int = 2
    score_func: str = "softmax"
    route_norm: bool = False
    route_scale: float = 1.0
    num_shared_experts: int = 0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    load_balance_coeff: float | None = 1e-3
    aux_loss_alpha: float = 0.0
    use_grouped_mm: bool = True  # False: one matmul per expert (the reference path)

    def __post_init__(self):
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEArgs.score_func = {self.score_func!r}: one of {', '.join(SCORE_FUNCS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEArgs.top_k = {self.top_k} must be between 1 and num_experts ({self.num_experts})")
        if self.num_experts % self.n_expert_groups:
            raise ValueError(f"MoEArgs.num_experts ({self.num_experts}) must be a multiple of "
                             f"n_expert_groups ({self.n_expert_groups})")
        if self.n_expert_groups > 1:
            allowed = self.n_limited_groups * (self.num_experts // self.n_expert_groups)
            if not 1 <= self.n_limited_groups <= self.n_expert_groups or allowed < self.top_k:
                raise ValueError(f"MoEArgs.n_limited_groups = {self.n_limited_groups} of {self.n_expert_groups} "
                                 f"groups leaves {allowed} experts to choose top_k = {self.top_k} from")
        if self.use_grouped_mm and (self.dim % 8 or self.moe_inter_dim % 8):
            # Grouped matmul wants 16-byte row strides: 8 elements in bfloat16 (4 in float32).
            raise ValueError(f"MoEArgs.dim ({self.dim}) and moe_inter_dim ({self.moe_inter_dim}) must be multiples "
                             "of 8 for the grouped matmul; set use_grouped_mm = False for other shapes")


class TokenChoiceRouter(nn.Module):
    """Each token chooses its top_k experts. The load-balancing bias (``expert_bias``, a buffer
    saved in checkpoints) shifts which experts are chosen but never the weights their outputs are
    scaled by, so balancing does not distort what the model computes."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        if args.load_balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, num_experts] routing scores in float32 (sums of many small probabilities)."""
        logits = self.gate(x).float()
        return logits.softmax(dim=-1) if self.args.score_func == "softmax" else logits.sigmoid()

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Set the scores of experts outside each token's best groups to -inf."""
        a = self.args
        grouped = choice.view(choice.shape[0], a.n_expert_groups, -1)
        best_two = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        keep = best_two.topk(a.n_limited_groups, dim=-1).indices
        mask = torch.ones_like(best_two, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view_as(choice)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, dim] -> (weights [tokens, top_k] float32, expert ids [tokens, top_k],
        tokens per expert [num_experts], scores [tokens, num_experts])."""
        a = self.args
        scores = self.scores(x)
        choice = scores.detach()
        if self.expert_bias is not None:
            choice = choice + self.expert_bias
        if a.n_expert_groups > 1:
            choice = self._limit_to_groups(choice)
        ids = choice.topk(a.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if a.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * a.route_scale
        # A scatter, not bincount: its output size does not depend on the data (compile-friendly).
        flat = ids.flatten()
        counts = flat.new_zeros(a.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        return weights, ids, counts, scores

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=init_std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [rows, in] sorted by group, w [groups, in, out], offsets int32 [groups] (cumulative row
    counts, the last = rows) -> [rows, out]: group g's rows times w[g], in one call.

    ``torch._grouped_mm`` is private (torch 2.13; listed in tests/test_private_apis.py) and the
    only place raytitan calls it. It runs on CPU for float32 and bfloat16, needs row strides of
    16 bytes, and leaves rows past the last offset unwritten. Under torch.compile it traces in
    bfloat16 only (its fake-tensor rule refuses float32), the dtype mixed precision trains in."""
    return torch._grouped_mm(x, w, offs=offsets)


def local_weight(w: torch.Tensor) -> torch.Tensor:
    """This rank's part of an expert weight: ``w`` itself, or a DTensor's local tensor. A DTensor
    replicated over a mesh dimension (tensor parallel's, under expert parallel: each tp rank
    computes the tokens of its own shard of the sequence) gets a gradient that is a partial sum
    over it (``Partial``), which FSDP adds up over those ranks before its reduce-scatter."""
    if not isinstance(w, DTensor):
        return w
    return w.to_local(grad_placements=[Partial() if p.is_replicate() else p for p in w.placements])


class GroupedExperts(nn.Module):
    """num_experts SwiGLU experts, w2(silu(w1 x) * w3 x), their weights stacked as
    [num_experts, out, in] (each expert's slice laid out as an nn.Linear weight)."""

    # The weights expert parallel splits on their expert dim (raytitan.distributed.expert_parallel).
    expert_parallel_weights = ("w1", "w2", "w3")

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True):
        super().__init__()
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, dim] sorted by expert, counts [num_experts] rows per expert -> [rows, dim]."""
        x = x.to(self.w1.dtype)
        if self.use_grouped_mm:
            return self._grouped(x, counts)
        return self._for_loop(x, counts)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) of the experts this rank computes: all of them, or under expert parallel
        (weights sharded on the expert dim, ``raytitan.distributed.expert_parallel``) the local
        slice, to which ``forward``'s rows have already been sent (``local_weight``)."""
        return tuple(local_weight(w) for w in (self.w1, self.w2, self.w3))

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.weights()
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(grouped_mm(x, w1.transpose(-2, -1), offsets)) * grouped_mm(x, w3.transpose(-2, -1), offsets)
        return grouped_mm(h, w2.transpose(-2, -1), offsets)

    def _for_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One SwiGLU per expert over its rows: the reference the grouped path must equal."""
        w1, w2, w3 = self.weights()
        outs = []
        for e, rows in enumerate(torch.split(x, counts.tolist())):
            h = F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e])
            outs.append(F.linear(h, w2[e]))
        return torch.cat(outs)

    def init_weights(self, init_std: float) -> None:
        # As the dense feed-forward: input projection at 0.02, the others depth-scaled.
        nn.init.trunc_normal_(self.w1, mean=0.0, std=0.02)
        for w in (self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std)


class MoE(nn.Module):
    """The MoE feed-forward: x [batch, seq, dim] -> shared(x) + sum over the chosen k of
    weight_k * expert_k(x). Counts the tokens each expert receives in training mode
    (``tokens_per_expert``, accumulated over microbatches until ``update_expert_bias``; evaluation
    forwards do not count; a forward recomputed under
    activation checkpointing counts again, which doubles every count and leaves the update,
    which reads only their signs against the mean, unchanged)."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.router = TokenChoiceRouter(args)
        self.experts = GroupedExperts(args.dim, args.moe_inter_dim, args.num_experts, args.use_grouped_mm)
        self.shared_experts = (FeedForward(args.dim, args.num_shared_experts * args.moe_inter_dim)
                               if args.num_shared_experts else None)
        # Transient (reset every step), so not saved: a checkpoint is taken after the update.
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        # Under tensor parallel (set by the family's plan): the ranks whose shards of the same
        # sequences this layer routes separately, over which the counts are summed as well.
        self.token_group: dist.ProcessGroup | None = None
        # Global counts (as the bias update saw them) since the last ``moe_metrics``, and the
        # routing-collapse watch: logged steps in a row above the threshold, warned yet.
        self.load_since_log: torch.Tensor | None = None
        self.collapse_streak, self.collapse_warned = 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, dim = x.shape
        flat = x.reshape(-1, dim)
        weights, ids, counts, scores = self.router(flat)
        if self.training:  # validation and sampling must not steer the next bias update
            with torch.no_grad():
                self.tokens_per_expert.add_(counts)
        if self.training and self.args.aux_loss_alpha > 0:
            self.aux_loss = sequence_aux_loss(scores.view(bsz, seq_len, -1), ids.view(bsz, seq_len, -1),
                                              self.args.top_k, self.args.aux_loss_alpha)
        # Sort the (token, choice) pairs by expert; a stable sort keeps the order deterministic.
        order = ids.flatten().argsort(stable=True)
        token = order // self.args.top_k
        routed = self.experts(flat[token], counts)
        routed = (routed.float() * weights.flatten()[order].unsqueeze(-1)).to(x.dtype)
        out = torch.zeros_like(flat).index_add_(0, token, routed)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(bsz, seq_len, dim)

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing (arXiv 2408.15664): raise the bias of experts below the
        mean load and lower it above, by ``load_balance_coeff``, then reset the counts. The
        change is centred (a common shift chooses the same experts); no gradient reaches it."""
        counts = self.tokens_per_expert if counts is None else counts
        load = counts.detach().float()
        self.load_since_log = load.clone() if self.load_since_log is None else self.load_since_log + load
        bias = self.router.expert_bias
        if bias is not None and counts.sum() > 0:
            delta = self.args.load_balance_coeff * torch.sign(counts.mean() - counts)
            bias.add_(delta - delta.mean())
        self.tokens_per_expert.zero_()

    def init_weights(self, init_std: float) -> None:
        """Deterministic from the global seed, in the conventions of the dense blocks."""
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)
        self.tokens_per_expert.zero_()
        self.aux_loss = None
        self.load_since_log = None

    def param_counts(self) -> tuple[int, int]:
        """(total, activated per token) parameters of this layer; activated = router + shared
        experts + top_k routed experts."""
        return moe_param_counts(self.args)


def sequence_aux_loss(scores: torch.Tensor, ids: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences: alpha * sum_i f_i * P_i
    with f_i = num_experts / (top_k * seq) x the tokens of the sequence choosing expert i and P_i
    the mean over the sequence of expert i's score normalized over experts.
    scores [batch, seq, experts], ids [batch, seq, top_k]."""
    bsz, seq_len, num_experts = scores.shape
    chosen = torch.zeros(bsz, num_experts, device=scores.device).scatter_add_(
        1, ids.reshape(bsz, -1), torch.ones(bsz, seq_len * top_k, device=scores.device))
    f = chosen * num_experts / (top_k * seq_len)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_load_balance_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Every MoE layer's bias update, after the optimizer step. With ``group`` (the ranks that
    see different tokens: data parallel) the counts are summed over it first, in one all-reduce,
    so every rank moves its bias the same way; under tensor parallel also over the layers'
    ``token_group`` (each tp rank routed its own shard of the sequences)."""
    layers = moe_layers(model)
    if not layers:
        return
    counts = torch.stack([m.tokens_per_expert for m in layers])
    if group is not None:
        dist.all_reduce(counts, group=group)
    # Under tensor parallel each tp rank routed its own shard of the sequences: add theirs too.
    token_groups = {id(m.token_group): m.token_group for m in layers if m.token_group is not None}
    for token_group in token_groups.values():
        dist.all_reduce(counts, group=token_group)
    for layer, c in zip(layers, counts):
        layer.update_expert_bias(c)


def collapse_threshold(top_k: int, num_experts: int) -> float | None:
    """The share of a layer's tokens above which one expert counts as collapsed onto: halfway
    between a balanced expert's share (``top_k / num_experts``: each token chooses ``top_k``
    distinct experts) and every token. 0.625 for 2 of 8 experts, 0.53 for 8 of 128. None when
    every token chooses every expert (no expert can take more than its share)."""
    if top_k >= num_experts:
        return None
    return (1 + top_k / num_experts) / 2


def _layer_index(name: str, fallback: int) -> int:
    """The block index in ``model.layers`` from a module name (wrappers may sit in between)."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else fallback


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def pipeline_group(parts: list[nn.Module]) -> dist.ProcessGroup | None:
    """The group of the ranks that hold the other pipeline stages of these parts' model
    (``pipeline_group``, set on each stage by ``raytitan.distributed.parallelize``); None
    without pipeline parallel."""
    return next((g for g in (getattr(p, "pipeline_group", None) for p in parts) if g is not None), None)


@torch.no_grad()
def moe_metrics(parts: list[nn.Module]) -> dict[str, float]:
    """Expert load of every MoE layer of ``parts`` over the tokens routed since the last call,
    from the global counts ``update_load_balance_bias`` summed over the data-parallel ranks (one
    host sync; under pipeline parallel one gather of a few numbers per layer over the pipeline
    ranks, so that every rank, rank 0 the one that logs, reports the layers of every stage). Per layer
    ``moe/layer_<i>/...``: ``max_over_mean``
    (the busiest expert's tokens over the mean per expert; 1 is balanced), ``busiest_share`` (the
    share of the layer's tokens that chose its busiest expert; ``top_k / num_experts`` is
    balanced, 1 is every token), ``bias_min`` / ``bias_max`` (``expert_bias`` now; layers with a
    bias only). Over layers: ``moe/max_over_mean``, ``moe/busiest_share`` and ``moe/worst_layer``
    (the layer with the highest max_over_mean), ``moe/bias_min``, ``moe/bias_max``. Layers that
    counted no tokens since the last call (no applied step) report nothing.

    Routing collapse: a layer whose busiest expert's share is above ``collapse_threshold`` at
    ``COLLAPSE_LOGGED_STEPS`` calls in a row gets one warning on rank 0, naming the expert."""
    layers = []
    for part in parts:
        for name, m in part.named_modules():
            if isinstance(m, MoE) and m.load_since_log is not None:
                layers.append((_layer_index(name, len(layers)), m))
    group = pipeline_group(parts)
    if not layers and group is None:
        return {}
    rows, local = [], {}
    for i, m in layers:
        load = m.load_since_log
        bias = m.router.expert_bias
        bias = torch.zeros(2, device=load.device) if bias is None else torch.stack([bias.min(), bias.max()])
        rows.append(torch.stack([load.max(), load.mean(), load.argmax().float(), load.sum(), *bias.float()]))
        m.load_since_log = None
        local[i] = m
    # (index, top, mean, busiest, total, bias min, bias max, has bias, top_k, num_experts, coeff)
    table = [[float(i), *values, float(m.router.expert_bias is not None), float(m.args.top_k),
              float(m.args.num_experts), float("nan") if m.args.load_balance_coeff is None else m.args.load_balance_coeff]
             for (i, m), values in zip(layers, torch.stack(rows).tolist() if rows else [])]
    if group is not None:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, table, group=group)
        table = sorted((row for stage in gathered for row in stage), key=lambda row: row[0])
    out: dict[str, float] = {}
    summary: dict[str, float] = {}  # after the per-layer keys
    remote = parts[0].__dict__.setdefault("moe_collapse_watch", {}) if parts else {}
    for i, top, mean, busiest, total, bias_min, bias_max, has_bias, top_k, n, coeff in table:
        i = int(i)
        if total <= 0:
            continue
        ratio, share = top / mean, top * top_k / total  # total counts top_k choices per token
        out[f"moe/layer_{i}/max_over_mean"] = ratio
        out[f"moe/layer_{i}/busiest_share"] = share
        if has_bias:
            out[f"moe/layer_{i}/bias_min"], out[f"moe/layer_{i}/bias_max"] = bias_min, bias_max
            summary["moe/bias_min"] = min(summary.get("moe/bias_min", bias_min), bias_min)
            summary["moe/bias_max"] = max(summary.get("moe/bias_max", bias_max), bias_max)
        if ratio > summary.get("moe/max_over_mean", 0.0):
            summary["moe/max_over_mean"], summary["moe/worst_layer"] = ratio, float(i)
        summary["moe/busiest_share"] = max(summary.get("moe/busiest_share", share), share)
        # The watch of a layer of another pipeline stage is kept on this rank's first part.
        watch = local[i] if i in local else remote.setdefault(i, _Watch())
        _watch_collapse(watch, i, int(busiest), share, int(top_k), int(n), None if math.isnan(coeff) else coeff)
    return {**out, **summary}


class _Watch:
    """The routing-collapse watch of a layer held by another pipeline stage (an ``MoE`` keeps its own)."""

    def __init__(self):
        self.collapse_streak, self.collapse_warned = 0, False


def _watch_collapse(layer, index: int, expert: int, share: float, top_k: int, num_experts: int,
                    coeff: float | None) -> None:
    threshold = collapse_threshold(top_k, num_experts)
    if threshold is None or share <= threshold:
        layer.collapse_streak = 0
        return
    layer.collapse_streak += 1
    if layer.collapse_streak >= COLLAPSE_LOGGED_STEPS and not layer.collapse_warned:
        layer.collapse_warned = True
        if _is_rank0():
            advice = (f"raise load_balance_coeff in the model's args (now {coeff:g}; e.g. ten times that)"
                      if coeff is not None else "set load_balance_coeff in the model's args (now None: no bias; e.g. 1e-3)")
            logger.warning(
                "MoE routing collapse in layer %d: expert %d took %.0f%% of the layer's tokens for %d logged steps "
                "in a row (balanced: %.0f%%, warned above %.0f%%); the load-balancing bias is not keeping up: %s. "
                "Warned once per layer.",
                index, expert, 100 * share, layer.collapse_streak, 100 * top_k / num_experts, 100 * threshold,
                advice)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the MoE layers' auxiliary losses from the last training forward (None when
    no layer has one); taken, so a later forward starts empty."""
    losses = []
    for m in moe_layers(model):  # one walk over the modules: this runs every microbatch
        if m.aux_loss is not None:
            losses.append(m.aux_loss)
            m.aux_loss = None
    return torch.stack(losses).sum() if losses else None


def moe_param_counts(args: MoEArgs) -> tuple[int, int]:
    """(total, activated per token) parameters of one MoE layer from its shape."""
    expert = 3 * args.dim * args.moe_inter_dim
    fixed = args.dim * args.num_experts + args.num_shared_experts * expert  # router + shared
    return fixed + args.num_experts * expert, fixed + args.top_k * expert


def activated_params(model: nn.Module) -> tuple[int, int]:
    """(total, activated per token) parameters of a model whose MoE layers are ``MoE`` modules:
    each layer's experts that a token does not choose are left out of the activated count."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in moe_layers(model):
        layer_total, layer_active = m.param_counts()
        idle += layer_total - layer_active
    return total, total - idle
