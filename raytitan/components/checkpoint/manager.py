"""Saving and loading a run's state through DCP: atomic commits, retention, async writes.

Where steps live and which count is ``layout``'s; this module writes and reads them. Loads
check keys and shapes first, so a wrong checkpoint is an error naming the key, never a
partial load; every save records checksums of what it wrote and every load checks what it reads
against them (``integrity``).
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from raytitan.components import storage
from raytitan.components.checkpoint import dcp_files, integrity, raw
from raytitan.components.checkpoint.convert import export_hf
from raytitan.components.checkpoint.layout import (
    COMMIT_MARKER, CheckpointError, check_files, committed_steps, is_intact_export, loadable_step, read_commit,
    read_commit_at, root_cause, step_dir, write_commit,
)
from raytitan.components.checkpoint.torchtitan import match_weights, step_kind, version_of

logger = logging.getLogger(__name__)


class ModelState(Stateful):
    """Model weights as a (possibly sharded) state dict that DCP reshards on load.

    ``parts`` are this rank's pipeline stages (or the one whole model); their parameter names
    are the whole model's, so the merged dict reads the same under any layout."""

    def __init__(self, parts: list[torch.nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            own = {k: state_dict[k] for k in get_model_state_dict(part)}
            set_model_state_dict(part, own, options=StateDictOptions(strict=True))

    def live_tensors(self) -> list[torch.Tensor]:
        """The tensors ``state_dict()`` reads (weights and buffers): see ``SnapshotSources``."""
        return [t for part in self.parts for t in (*part.parameters(), *part.buffers())]

    def plain_state_dict(self) -> dict[str, Any]:
        """The entries of ``state_dict()`` that are not tensors: none."""
        return {}


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter name (flattened), one optimizer per model part.

    Loading restores the moments and step counts only: the hyperparameters (lr, betas, eps,
    weight decay) stay this run's, from its config and LR schedule. Otherwise a run resumed with
    more ``training.steps`` or a new ``optimizer.lr`` would take its first step at the saved lr,
    since DCP loads its entries in key order ("lr_scheduler" before "optimizer")."""

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.pairs = list(zip(parts, optimizers))
        self._names: list[list[list[str]]] | None = None  # see plain_state_dict

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part, o in self.pairs for k, v in get_optimizer_state_dict(part, o, options=self.OPTIONS).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, o in self.pairs:
            own = {k: state_dict[k] for k in get_optimizer_state_dict(part, o, options=self.OPTIONS)}
            hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
            set_optimizer_state_dict(part, o, own, options=self.OPTIONS)
            for group, kept in zip(o.param_groups, hyperparameters, strict=True):
                group.update(kept)

    def live_tensors(self) -> list[torch.Tensor]:
        """The tensors ``state_dict()`` reads (weights, moments, step counts): see ``SnapshotSources``."""
        return [t for _, o in self.pairs for g in o.param_groups for p in g["params"]
                for t in (p, *(v for v in o.state.get(p, {}).values() if isinstance(v, torch.Tensor)))]

    def plain_state_dict(self) -> dict[str, Any]:
        """The entries of ``state_dict()`` that are not tensors (every parameter's hyperparameters),
        read from the optimizers' groups as they are now, without building the rest: keyed as
        ``state_dict()`` keys them, ``param_groups.<name>.<key>`` (``SnapshotSources`` checks that
        the two agree before relying on this)."""
        if self._names is None:  # each group's parameter names, in the group's order
            self._names = [[g["params"] for g in get_optimizer_state_dict(part, o)["param_groups"]]
                           for part, o in self.pairs]
        plain = {}
        for (_, o), names in zip(self.pairs, self._names):
            for group, group_names in zip(o.param_groups, names, strict=True):
                for p, name in zip(group["params"], group_names, strict=True):
                    plain.update({f"state.{name}.{k}": v for k, v in o.state.get(p, {}).items()
                                  if not isinstance(v, torch.Tensor)})
                    plain.update({f"param_groups.{name}.{k}": v for k, v in group.items() if k != "params"})
        return plain


def tensor_shapes(states: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Global shapes of the tensors in (nested) state dicts, keyed as DCP flattens them."""
    shapes = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            value = value.state_dict()
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            shapes[prefix] = tuple(value.shape)

    visit("", states)
    return shapes


def check_compatible(path: str, metadata: Metadata, expected: dict[str, tuple[int, ...]],
                     model_keys: set[str] | None = None) -> None:
    """The checkpoint holds every tensor ``expected`` names, in that shape (and, given the model's
    full key set, no model weights the model lacks): a clear error instead of a partial load."""
    stored = metadata.state_dict_metadata
    for key, shape in expected.items():
        meta = stored.get(key)
        if meta is None:
            raise CheckpointError(f"checkpoint {path} has no '{key}': it was saved from a different model "
                                  "(or without that state: see checkpoint.exclude_from_loading)")
        if not hasattr(meta, "size"):
            raise CheckpointError(f"checkpoint {path}: '{key}' is stored as bytes, not a tensor")
        if tuple(meta.size) != shape:
            raise CheckpointError(f"checkpoint {path}: '{key}' has shape {list(meta.size)} but this model's is "
                                  f"{list(shape)}: was it saved from another model.flavor or tokenizer?")
    if model_keys is not None:
        extra = sorted(k for k in stored if k.startswith("model.") and k.removeprefix("model.") not in model_keys)
        if extra:
            raise CheckpointError(f"checkpoint {path} has {len(extra)} model weights this model lacks "
                                  f"(first: '{extra[0]}'): was it saved from another model.flavor?")


def check_tying(path: str, marker: dict, model_args: dict | None) -> None:
    """A step saved with an output head of its own does not load into a model whose args tie the
    head to the embedding (``tie_embeddings``): both names would load into the one weight and one
    of them would win without a word. Steps that record no model shape (imports) are not judged."""
    if not (model_args or {}).get("tie_embeddings") or "model_args" not in marker:
        return
    if not marker["model_args"].get("tie_embeddings", False):
        raise CheckpointError(
            f"checkpoint {path} was saved with an untied output head (output.weight a matrix of its own), but this "
            "model ties output.weight to tok_embeddings.weight (one weight): the two cannot become one. Load it "
            "into the untied flavor of the same shape (llama3 1B_untied / 3B_untied for Llama 3.2 1B / 3B runs "
            "saved before raytitan tied them; keep ray.name to resume the same run folder)")


class NonFiniteSnapshot(Exception):
    """This rank's part of a memory snapshot holds weights that are not finite: it was neither
    written nor sealed, so that snapshot never completes (the trainer stops the run on it)."""

    def __init__(self, step: int, key: str):
        super().__init__(f"memory snapshot of step {step}: this rank's part holds weights that are not finite "
                         f"(first: {key}); not written, not sealed")
        self.step, self.key = step, key


# Weight dtypes whose sum is checked as they are (any other floating dtype: item by item, in fp32).
SUMMED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def weight_spans(writer: raw.RawWriter) -> list[tuple[torch.dtype, int, int, list[tuple[int, int, str]]]]:
    """Where this rank's snapshot part holds model weights: (dtype, start, end, its items as (start,
    end, key)), items of one dtype that lie next to each other merged into one span. The padding
    between merged items is zeroed here, in every buffer a part may be packed into, once per plan
    (``pack`` writes the items only), so a span reads as one array of its dtype."""
    found = []
    for item in writer.items:
        if item.type == WriteItemType.BYTE_IO or not item.index.fqn.startswith("model."):
            continue
        dtype = item.tensor_data.properties.dtype
        if dtype.is_floating_point:
            offset, length = writer.offsets[raw._key(item)]
            found.append((offset, offset + length, dtype, item.index.fqn))
    spans: list[tuple[torch.dtype, int, int, list[tuple[int, int, str]]]] = []
    for start, end, dtype, key in sorted(found, key=lambda f: f[0]):
        last = spans[-1] if spans else None
        if last and last[0] == dtype and dtype in SUMMED_DTYPES and -(-last[2] // raw.ALIGN) * raw.ALIGN == start:
            for buffer in writer.buffers():
                buffer[last[2]:start].zero_()
            spans[-1] = (dtype, last[1], end, last[3] + [(start, end, key)])
        else:
            spans.append((dtype, start, end, [(start, end, key)]))
    return spans


def first_nonfinite(buffer: torch.Tensor, spans) -> str | None:
    """The key of the first weight in ``buffer`` (a part, laid out as ``spans`` say) that holds a
    NaN or an infinity, or None. One sum per span: a sum is finite only if every element is (a NaN
    or an infinity carries through; overflow of finite values to an infinity is checked again
    element by element), so a part of finite weights costs one pass over them and no allocation."""
    for dtype, start, end, items in spans:
        if dtype in SUMMED_DTYPES and bool(torch.isfinite(buffer[start:end].view(dtype).sum())):
            continue
        for item_start, item_end, key in items:
            if not bool(torch.isfinite(buffer[item_start:item_end].view(dtype).float()).all()):
                return key
    return None


def _frozen(value: Any) -> tuple | None:
    """A key that tells ``value`` apart from every other value of the plain kinds (bool, int, str,
    None, float by its repr: -0.0 and nan too; tuples of them), or None for any other value."""
    kind = type(value)
    if kind in (bool, int, str, type(None)):
        return (kind, value)
    if kind is float:
        return (kind, repr(value))
    if kind is tuple:
        inner = tuple(_frozen(v) for v in value)
        return None if None in inner else (kind, inner)
    return None


class SnapshotPlanner(DefaultSavePlanner):
    """DCP's save planner, with the bytes of small plain values kept from snapshot to snapshot.

    The flattened optimizer state holds every parameter's hyperparameters as items of their own
    (betas, eps, weight decay, flags: about 11 per parameter), and DCP frames each with
    ``torch.save``: about 0.1 ms each, most of a snapshot's time on the training thread (the
    debug model's 57 parameters: 627 of them, 70 ms per snapshot in one process). Equal plain
    values give equal bytes, so each distinct one is framed once; the values themselves are read
    anew at every snapshot (an lr that changed is a new value, framed once for all parameters)."""

    MEMO_SIZE = 4096  # distinct values kept; an lr that changes every step would grow it without end

    def __init__(self, memo: dict[tuple, bytes]):
        super().__init__()
        self.memo = memo

    def transform_object(self, write_item, object: Any):
        key = _frozen(object) if write_item.type == WriteItemType.BYTE_IO else None
        if key is None:
            return super().transform_object(write_item, object)
        data = self.memo.get(key)
        if data is None:
            if len(self.memo) >= self.MEMO_SIZE:
                self.memo.clear()
            framed = io.BytesIO()
            torch.save(object, framed)
            data = self.memo[key] = framed.getvalue()
        return io.BytesIO(data)


def _storage_of(t: torch.Tensor) -> int:
    """Where ``t``'s elements (its local shard's, for a DTensor) are, or -1 for a tensor subclass
    without storage of its own (Float8's weight wrapper: told apart by its identity alone)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    try:
        return local.data_ptr()
    except RuntimeError:
        return -1


class SnapshotSources:
    """What lets a memory snapshot skip rebuilding the model's and the optimizer's state dicts.

    Building them (names, DTensor views, flattening) costs milliseconds per snapshot on the training
    thread (about 20 ms for the debug model, two thirds of its snapshot), and gives the same tensors
    every time: the optimizer updates weights and moments in place. So after a full build the
    writer keeps where each tensor is copied from (``RawWriter.pack``), and later snapshots copy
    from there while every tensor those states read (their ``live_tensors()``) is still the same
    object on the same storage as at the build; what is not a tensor (hyperparameters through
    their ``plain_state_dict()``, the schedule, the data cursor, the step) is read anew each time.
    At each full build, ``plain_state_dict()`` is checked against the built state dict: if the two
    disagree (a torch that flattens optimizer state another way), every snapshot is built in full."""

    def __init__(self, states: dict[str, Any]):
        self.states = states
        self.kept = [name for name, state in states.items() if hasattr(state, "plain_state_dict")]
        self.tensor_keys: frozenset[str] = frozenset()  # flattened keys copied from the writer's kept sources
        self.fingerprint: tuple | None = None  # the live tensors at the last full build; None: build in full
        self.warned = False

    def _fingerprint(self) -> tuple:
        with torch.no_grad():
            return tuple((id(t), _storage_of(t)) for name in self.kept for t in self.states[name].live_tensors())

    def _plain_planner(self, memo: dict[tuple, bytes], rank0: bool) -> SnapshotPlanner:
        """A planner over the small states, flattened by DCP, and the kept states' plain entries,
        which are flat already (DCP's flattening costs about 7 us an entry: ms for the optimizer's)."""
        planner = SnapshotPlanner(memo)
        planner.set_up_planner({name: state.state_dict() if isinstance(state, Stateful) else state
                                for name, state in self.states.items() if name not in self.kept}, None, rank0)
        planner.state_dict.update({f"{name}.{k}": v for name in self.kept
                                   for k, v in self.states[name].plain_state_dict().items()})
        return planner

    def planner(self, memo: dict[tuple, bytes], rank0: bool) -> SnapshotPlanner | None:
        """A planner over everything but the kept tensors, if they are still the states' tensors."""
        if self.fingerprint is None or self._fingerprint() != self.fingerprint:
            return None
        return self._plain_planner(memo, rank0)

    def built(self, flat: dict[str, Any], memo: dict[tuple, bytes], rank0: bool) -> None:
        """After a full build (``flat``: its planner's flattened state dict): keep its tensors for
        the snapshots to come, if the plain entries read without building agree with it."""
        plain = self._plain_planner(memo, rank0).state_dict
        prefixes = tuple(f"{name}." for name in self.kept)
        self.tensor_keys = frozenset(k for k in flat if k.startswith(prefixes) and k not in plain)
        agree = plain.keys() | self.tensor_keys == flat.keys() \
            and all(isinstance(flat[k], torch.Tensor) for k in self.tensor_keys) \
            and all(_same(plain[k], flat[k]) for k in plain if k.startswith(prefixes))
        if not agree and not self.warned:
            self.warned = True
            logger.warning("memory snapshots: the optimizer's hyperparameters read from its groups do not match its "
                           "state dict; every snapshot builds the state dicts in full (slower, the same contents)")
        self.fingerprint = self._fingerprint() if agree else None


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (tensors: equal elements; floats: equal reprs, nan too)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    frozen = _frozen(a)
    return frozen == _frozen(b) if frozen is not None else type(a) is type(b) and a == b


LOADABLE = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
STALL_WINDOW = 10_000  # snapshot stalls kept for the median logged at close


class CheckpointManager:
    """Saves the steps the trainer asks for; resumes from the newest committed step.

    With ``async_mode`` the write of a step overlaps the next training steps: ``save`` returns
    once the state is copied (staged), the step is committed when its write completes (see
    ``poll``), and at most one save is in flight.
    """

    def __init__(self, folder: str, states: dict[str, Stateful], keep_latest_k: int,
                 process_group: dist.ProcessGroup | None = None,
                 before_commit: Callable[[int], None] | None = None, async_mode: str = "disabled",
                 exclude_from_loading: tuple[str, ...] | list[str] = (), model_keys: set[str] | None = None,
                 commit_info: dict | None = None, last_save_model_only: bool = False,
                 export_dtype: torch.dtype = torch.float32, last_save_in_hf: bool = False, raw_bytes: bool = False,
                 failed_write_ends_run: bool = True):
        """``process_group``: the ranks that hold state (all by default; a gloo group for async
        saves); ``before_commit``: a hook each rank calls after writing its part of step N, before
        the commit (fault injection); ``model_keys``: the whole model's parameter names, to reject
        checkpoints of bigger models; ``commit_info``: extra facts for the commit marker (the
        model's shape, for exports); the ``last_*`` and ``export_dtype`` options shape the run's
        last save (see ``save_last``); ``raw_bytes``: write tensors as their bytes, without
        checksums (``raw``: memory snapshots); ``failed_write_ends_run=False``: a failed async write
        is logged and training goes on, the previous step staying the newest (memory snapshots:
        a store lost with its node)."""
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"checkpoint.async_mode = {async_mode!r} is not one of {', '.join(ASYNC_MODES)}")
        self.folder, self.states = folder, states
        self.keep_latest_k = keep_latest_k
        self.group, self.before_commit = process_group, before_commit
        self.async_mode, self.exclude = async_mode, set(exclude_from_loading)
        self.model_keys, self.commit_info = model_keys, commit_info or {}
        self.last_save_model_only, self.export_dtype, self.last_save_in_hf = last_save_model_only, export_dtype, last_save_in_hf
        self.raw_bytes, self.failed_write_ends_run = raw_bytes, failed_write_ends_run
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_save_seconds = 0.0  # how long the last save blocked training
        self.last_checksum_seconds = 0.0  # how long this rank hashed the last committed save's bytes
        self.last_check_seconds = 0.0  # how long this rank checked the bytes of its last load
        self._fall_back = False  # the step to load was picked by resolve_load_step: may fall back
        self._pending: _PendingSave | None = None
        self._raw_writer: raw.RawWriter | None = None
        self._sink = None  # where raw snapshots go (the snapshot stores' filesystem)
        self.snapshots_skipped = 0  # raw snapshots skipped: the previous one was still being sent
        self.nonfinite_step: int | None = None  # the first raw snapshot whose part held non-finite weights
        self._spans: tuple[str, list] = ("", [])  # (the plan's part name, ``weight_spans`` of it)
        self._framed: dict[tuple, bytes] = {}  # small plain values' bytes, from snapshot to snapshot (SnapshotPlanner)
        self._sources = SnapshotSources(states)  # what lets a snapshot skip building the big state dicts
        self.snapshots_built = 0  # raw snapshots whose state dicts were built in full (the rest reused the last build)
        # Seconds the newest raw snapshots held the training thread (a window: one a step, for weeks).
        self.snapshot_stalls: collections.deque[float] = collections.deque(maxlen=STALL_WINDOW)
        self.snapshots_taken, self.first_snapshot_stall = 0, None  # the first one plans the layout
        self._stager = None
        if async_mode == "async_with_pinned_mem" and not torch.cuda.is_available():
            logger.info("checkpoint.async_mode = async_with_pinned_mem: pinned memory needs CUDA; staging in "
                        "ordinary memory as async does")
        self._committed: str | None = None  # newest step this rank committed, not yet taken

    # ------------------------------------------------------------------ saving

    def save(self, step: int, model_only: bool = False, dtype: torch.dtype | None = None,
             blocking: bool | None = None) -> str | None:
        """Write ``step-N`` on every rank and commit it. Returns the step folder once committed,
        or None while an async write is still in flight. ``dtype`` converts a model-only save's
        weights (an export); ``blocking`` overrides the async mode (the last save of a run)."""
        t0 = time.perf_counter()
        if self.raw_bytes:
            return self._save_snapshot(step, t0, blocking)
        self.wait()  # at most one save in flight
        path = step_dir(self.folder, step)
        if self.rank == 0:
            # An uncommitted folder of the same step is debris from a crashed save; a committed one
            # is an export, damaged, or newer than the load_step this run resumed from.
            if storage.isfile(storage.join(path, COMMIT_MARKER)):
                logger.warning("replacing the committed %s%s with a new save of that step", path,
                               " (weights only)" if is_intact_export(self.folder, step) else "")
            storage.rmtree(path)
            storage.makedirs(path)
        self._barrier()
        states = self._states_to_save(model_only, dtype)
        writer = integrity.writer(path)  # hashes what it writes (in the background for async saves)
        if blocking is False or (blocking is None and self.async_mode != "disabled"):
            response = dcp.async_save(states, checkpoint_id=path, storage_writer=writer,
                                      process_group=self.group, async_stager=self._async_stager())
            staged, written = (response.staging_completion, response.upload_completion) \
                if isinstance(response, AsyncSaveResponse) else (None, response)
            self._pending = _PendingSave(step, path, model_only, written, staged, t0, writer)
            self.last_save_seconds = time.perf_counter() - t0
            logger.info("checkpoint step %d: staged in %.2fs, writing in the background", step, self.last_save_seconds)
            return None
        dcp.save(states, checkpoint_id=path, storage_writer=writer, process_group=self.group)
        self.last_checksum_seconds = integrity.hashing_seconds(writer)
        if self.before_commit:
            self.before_commit(step)
        self._barrier()  # every rank wrote its part: only now may rank 0 commit
        if self.rank == 0:
            self._commit(step, path, model_only)
        self._barrier()
        self.last_save_seconds = time.perf_counter() - t0
        logger.info("saved checkpoint step %d to %s in %.2fs (checksums %.3fs)", step, path, self.last_save_seconds,
                    self.last_checksum_seconds)
        return path

    def _save_snapshot(self, step: int, t0: float, blocking: bool | None) -> str | None:
        """A memory snapshot (``raw_bytes``; see ``raw.RawWriter``): this rank's part is copied
        now and sent on by a thread, which seals it once its holders have it; the stores count a
        snapshot complete when every rank's part is sealed. No collective and no wait on another
        rank, except at a group's first snapshot (or when the state's keys change), which DCP
        plans. While the previous part is still being sent, the snapshot is skipped (counted in
        ``snapshots_skipped``) rather than stalling the step; ``blocking`` waits for it instead."""
        path = step_dir(self.folder, step)
        if self._raw_writer is None:
            sink, _ = storage.handler(self.folder)
            if not hasattr(sink, "write_and_seal"):
                raise CheckpointError(f"raw snapshots go to a snapshot store (raysnap://), not {self.folder}")
            slots = getattr(sink, "slots", None)
            owner = f"{self.folder}#{dist.get_rank(self.group) if dist.is_initialized() else 0}"
            self._raw_writer = raw.RawWriter(path, slots_for=functools.partial(slots, owner) if slots else None)
            self._sink = sink
        writer = self._raw_writer
        self._finish_snapshot(wait=bool(blocking))
        if writer.busy():
            self.snapshots_skipped += 1
            logger.info("memory snapshot of step %d skipped: the previous one is still being sent, or its store "
                        "keeps a part in every slot (%d skipped)", step, self.snapshots_skipped)
            return None
        writer.reset(path)
        planner = self._sources.planner(self._framed, self.rank == 0) if writer.name else None
        if planner is not None and writer.planned_for(planner, self._sources.tensor_keys):
            writer.pack(planner, kept=self._sources.tensor_keys)  # the tensors from where the last build found them
        else:
            planner = SnapshotPlanner(self._framed)
            planner.set_up_planner({k: v.state_dict() if isinstance(v, Stateful) else v
                                    for k, v in self.states.items()}, None, self.rank == 0)
            if writer.planned_for(planner):
                writer.pack(planner)
            else:  # a new group (or new state keys): DCP plans who writes what, once
                dcp.save(self.states, checkpoint_id=path, storage_writer=writer, process_group=self.group)
            self._sources.built(planner.state_dict, self._framed, self.rank == 0)
            self.snapshots_built += 1
        group_rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if self._spans[0] != writer.name:  # a new plan: where its weights lie
            self._spans = (writer.name, weight_spans(writer))
        writer.send(step, functools.partial(self._deliver, group_rank, world, writer.name.rsplit("-", 1)[-1][:-4],
                                            self._spans[1]))
        self._pending = _PendingSave(step, path, False, writer.uploaded, None, t0, writer)
        self.last_save_seconds = time.perf_counter() - t0
        self.snapshot_stalls.append(self.last_save_seconds)
        self.snapshots_taken += 1
        if self.first_snapshot_stall is None:
            self.first_snapshot_stall = self.last_save_seconds
        if blocking:
            self._finish_snapshot(wait=True)
            return path
        return None

    def _deliver(self, rank: int, world: int, layout: str, spans: list, step: int, part: str, body, tail: bytes,
                 metadata: bytes | None, slot: tuple | None) -> None:
        """On the upload thread: the weights in the part checked finite (else ``NonFiniteSnapshot``:
        nothing written, nothing sealed), the group's layout (rank 0, first time), the part to its
        holders, then the seal that makes it count. The check reads this rank's own part, in the
        buffer the training thread copied it to: no collective, nothing on the training thread."""
        bad = first_nonfinite(torch.from_numpy(body), spans)
        if bad is not None:
            if slot is not None:
                slot[0].free.add(slot[1])  # never handed to the store: free again
            raise NonFiniteSnapshot(step, bad)
        _, folder = storage.resolve(self.folder)
        if metadata is not None:
            self._sink.register_layout(folder, layout, world, metadata, self.commit_info)
        _, inner = storage.resolve(part)
        # before_commit: fault injection, between the part's writes and its seal
        self._sink.write_and_seal(inner, body, tail, folder, layout, step, rank, slot, self.before_commit)

    def _finish_snapshot(self, wait: bool) -> str | None:
        """The in-flight snapshot's outcome, once its part is sealed (``wait``: block for it). A
        failed write is logged (``failed_write_ends_run=False``): that snapshot just never counts.
        A part whose weights were not finite is logged and remembered in ``nonfinite_step``, for the
        trainer to stop on (every rank at the same step: see ``Trainer``)."""
        pending = self._pending
        if pending is None or not (wait or pending.written.done()):
            return None
        self._pending = None
        try:
            pending.written.result()
        except NonFiniteSnapshot as e:
            logger.error("%s; the previous complete snapshot stays the latest", e)
            if self.nonfinite_step is None:
                self.nonfinite_step = e.step
            return None
        except (Exception, CheckpointException) as e:
            message = f"writing memory snapshot {pending.path} failed: {root_cause(e)}; the previous complete " \
                      "snapshot stays the latest"
            if self.failed_write_ends_run:
                raise CheckpointError(message) from e
            logger.warning(message)
            return None
        self._committed = pending.path
        return pending.path

    def save_last(self, step: int) -> str:
        """The run's last save: blocking, optionally weights only in ``export_dtype``, and
        optionally exported as a Hugging Face folder ``step-N-hf`` next to it (by rank 0)."""
        dtype = self.export_dtype if self.last_save_model_only and self.export_dtype != torch.float32 else None
        path = self.save(step, model_only=self.last_save_model_only, dtype=dtype, blocking=True)
        if self.last_save_in_hf and self.rank == 0:

            t0 = time.perf_counter()
            out = export_hf(path, path + "-hf", dtype=self.export_dtype)
            logger.info("exported step %d as a Hugging Face folder %s in %.2fs", step, out, time.perf_counter() - t0)
        return path

    def _states_to_save(self, model_only: bool, dtype: torch.dtype | None) -> dict[str, Any]:
        if not model_only:
            return self.states
        if dtype is None:
            return {"model": self.states["model"]}
        return {"model": {k: v.detach().to(dtype) for k, v in self.states["model"].state_dict().items()}}

    def _async_stager(self) -> DefaultStager:
        """One stager for the whole run, so its staging memory is reused from save to save
        (allocating it anew for every save more than doubled the stall in benchmarks/checkpoint.py):
        pinned memory with the copy in the background on CUDA for ``async_with_pinned_mem``, a
        plain blocking copy otherwise."""
        if self._stager is None:
            pinned = self.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=pinned, use_non_blocking_copy=pinned))
        return self._stager

    def wait_for_staging(self) -> None:
        """Block until an in-flight save has copied the weights (call before changing them)."""
        if self._pending is not None and self._pending.staged is not None:
            self._pending.staged.result()
            self._pending.staged = None

    def poll(self) -> str | None:
        """Commit the in-flight save if its write completed; returns the folder committed by this
        call on rank 0 (None elsewhere, or when nothing completed). Not collective."""
        if self.raw_bytes:
            return self._finish_snapshot(wait=False)
        if self._pending is None or not self._pending.written.done():
            return None
        return self._finish_pending()

    def wait(self) -> str | None:
        """Finish the in-flight save, if any (collective: every rank calls it at the same point)."""
        if self.raw_bytes:
            return self._finish_snapshot(wait=True)
        if self._pending is None:
            return None
        return self._finish_pending()  # blocks until the write completes

    def close(self) -> None:
        """Clean shutdown: the in-flight save completes and commits."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._raw_writer is not None:
            self._raw_writer.close()
        if self.snapshot_stalls:
            stalls = sorted(self.snapshot_stalls)
            logger.info("memory snapshots: %d taken (%d built the state dicts in full), %d skipped (the previous one "
                        "still being sent); the training thread waited %.3fs per snapshot (median of the last %d; "
                        "first, planned: %.3fs)", self.snapshots_taken, self.snapshots_built, self.snapshots_skipped,
                        stalls[len(stalls) // 2], len(stalls), self.first_snapshot_stall)
            self.snapshot_stalls.clear()

    def _finish_pending(self) -> str | None:
        pending, self._pending = self._pending, None
        try:
            pending.written.result()
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            message = f"writing checkpoint {pending.path} failed: {root_cause(e)}; the previous committed " \
                      "checkpoint stays the latest"
            if self.failed_write_ends_run:
                raise CheckpointError(message) from e
            logger.warning(message)  # the step is not committed; training goes on
            return None
        self.last_checksum_seconds = integrity.hashing_seconds(pending.writer)
        if self.before_commit:
            self.before_commit(pending.step)
        # DCP wrote the metadata after every rank's data: rank 0 may commit without a barrier.
        if self.rank != 0:
            return None
        self._commit(pending.step, pending.path, pending.model_only)
        logger.info("committed checkpoint step %d to %s (%.2fs after the save began)", pending.step, pending.path,
                    time.perf_counter() - pending.started)
        return pending.path

    def _commit(self, step: int, path: str, model_only: bool) -> None:
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        write_commit(path, {"step": step, "world_size": world, "time": time.time(), "model_only": model_only,
                            "checksums": integrity.ALGORITHM, **self.commit_info})
        self._committed = path
        self._purge_old()

    def take_committed(self) -> str | None:
        """The newest step committed (by this rank: rank 0) since the last call, to report."""
        path, self._committed = self._committed, None
        return path

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _purge_old(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for step in committed_steps(self.folder)[: -self.keep_latest_k]:
            if step == 0:
                continue  # a seed checkpoint is the run's origin; keep it
            path = step_dir(self.folder, step)
            storage.remove(storage.join(path, COMMIT_MARKER))  # uncommit first: never half-deleted yet valid
            storage.rmtree(path)

    # ------------------------------------------------------------------ loading

    def resolve_load_step(self, load_step: int = -1) -> int | None:
        """The step ``load`` should restore (see ``layout.loadable_step``). Without ``load_step``,
        ``load`` may fall back from it to an older step whose bytes pass their checksums."""
        self._fall_back = load_step < 0
        return loadable_step(self.folder, load_step)

    def load(self, step: int) -> int:
        """Restore every state from ``step-N``, resharded to this run's layout; returns the step
        restored. A model-only checkpoint (a seed checkpoint) restores the weights alone.

        When ``step`` came from ``resolve_load_step()`` without a ``load_step`` and an item fails its
        checksum while loading (on any rank: DCP fails the load on all), the step is skipped like
        any damaged one, with a warning naming it and the key, and the newest older intact step is
        loaded instead: it overwrites every state the failed load may have touched. Collective."""
        damaged: dict[int, str] = {}
        while True:
            path = step_dir(self.folder, step)
            try:
                self.load_path(path, model_only=read_commit(self.folder, step).get("model_only", False))
                return step
            except integrity.ChecksumError as e:
                if not self._fall_back:
                    raise
                logger.warning("skipping damaged checkpoint %s: %s", path, e)
                damaged[step] = str(e)
            step = loadable_step(self.folder, damaged=damaged)  # raises naming every damaged step if none is left

    def load_path(self, path: str, model_only: bool) -> None:
        """Restore from a committed step folder anywhere (e.g. ``checkpoint.initial_load_path``),
        except the states named in ``exclude_from_loading``; or, with ``model_only``, the weights
        of a torchtitan step folder (read in place: see ``torchtitan``)."""
        if not storage.isfile(storage.join(path, COMMIT_MARKER)):
            if step_kind(path) == "torchtitan":  # else an error saying what the folder is
                if not model_only:
                    raise CheckpointError(f"{path} is a torchtitan step: raytitan reads its model weights only "
                                          "(checkpoint.initial_load_model_only = true)")
                if "model" not in self.exclude:
                    check_tying(path, {"model_args": {}}, self.commit_info.get("model_args"))  # torchtitan's Llama: untied
                    self._load_torchtitan(path)
                return
        names = ["model"] if model_only else list(self.states)
        states = {k: self.states[k] for k in names if k not in self.exclude}
        if not states:
            return
        metadata = check_files(path)
        check_compatible(path, metadata, tensor_shapes(states), self.model_keys)
        marker = read_commit_at(path)
        if "model" in states:
            check_tying(path, marker, self.commit_info.get("model_args"))
        reader = raw.RawReader(path) if marker.get("format") == raw.FORMAT else integrity.reader(path, metadata, marker)
        try:
            dcp.load(states, checkpoint_id=path, storage_reader=reader, process_group=self.group)
            self.last_check_seconds = integrity.checking_seconds(reader)
        except (Exception, CheckpointException) as e:
            if (damage := _checksum_error(e)) is not None:
                raise integrity.ChecksumError(
                    f"{damage}; `python -m raytitan.checkpoints verify {path}` lists every damaged item") from e
            raise CheckpointError(
                f"cannot load checkpoint {path}: {root_cause(e)}. `python -m raytitan.checkpoints verify {path}` "
                f"names the damaged file and key; delete its {COMMIT_MARKER} file so the run falls back to the "
                "previous step"
            ) from e

    def _load_torchtitan(self, path: str) -> None:
        """A torchtitan step's weights into this rank's model parts, in place: DCP gets the step's
        names as keys and this rank's (sharded) parameters as values, so each rank reads only the
        slices it holds, resharded like any step, and nothing is converted or copied first."""
        t0 = time.perf_counter()
        model = self.states["model"]
        own = model.state_dict()
        metadata = check_files(path)
        names = match_weights(path, metadata, {k: tuple(v.shape) for k, v in own.items()}, self.model_keys)
        renamed = {names[k]: v for k, v in own.items()}
        try:
            dcp.load(renamed, checkpoint_id=path, storage_reader=dcp_files.reader(path), process_group=self.group)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"cannot load torchtitan step {path}: {root_cause(e)} (its files are complete: "
                                  "one of them is damaged)") from e
        model.load_state_dict({k: renamed[names[k]] for k in own})
        logger.info("loaded the weights of %s (torchtitan %s.x names) in %.2fs", path, version_of(names),
                    time.perf_counter() - t0)


def _checksum_error(e: BaseException) -> integrity.ChecksumError | None:
    """The checksum mismatch behind a failed DCP load (on whichever rank found it), if that was it."""
    if isinstance(e, integrity.ChecksumError):
        return e
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            found = _checksum_error(failure[0] if isinstance(failure, tuple) else failure)
            if found is not None:
                return found
    return None


@dataclass
class _PendingSave:
    step: int
    path: str
    model_only: bool
    written: Future
    staged: Future | None
    started: float
    writer: Any = None  # its fs.seconds: hashing time
