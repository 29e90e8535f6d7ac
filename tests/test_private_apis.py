"""Every private API of torch, torchao and Ray that raytitan uses, checked against the installed
versions, so that an upgrade that moves or changes one fails here, loudly, instead of the package
degrading quietly (a skipped optimization, a lost log filter, a slow read).

The private names the package uses, and the one place each is used:

torch 2.13
- ``DeviceMesh._flatten`` (no public way to flatten mesh dims): raytitan/distributed/dims.py
  ``flatten_dims``.
- Ring attention, ``torch.distributed.tensor.experimental._context_parallel._attention``:
  ``_templated_ring_attention``, ``_templated_ring_attention_backward``, ``_cp_options``
  (``enable_load_balance``, ``rotate_method``) and ``_RotateMethod``; and
  ``torch.distributed.distributed_c10d._resolve_process_group`` (the ring's custom ops take their
  group by name): raytitan/distributed/context.py ``TorchRing``.
- ATen's internal attention kernels ``aten._scaled_dot_product_flash_attention_for_cpu`` and
  ``aten._scaled_dot_product_flash_attention`` with their ``_backward`` ops: context.py
  ``KERNELS``; and ``aten._scaled_mm``, ``aten._scaled_dot_product_{efficient,flash,cudnn}_attention``,
  ``aten._scaled_dot_product_flash_attention_for_cpu`` as op names the per-op activation
  checkpointing policy keeps: raytitan/distributed/activation_checkpoint.py ``SAVED_OPS``.
- ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper`` (the wrapper
  that keeps state-dict keys unchanged): activation_checkpoint.py.
- ``FileSystemReader._slice_file``, overridden for one ranged read per item on object stores
  and for each item's checksum check: raytitan/components/checkpoint/dcp_files.py ``_ArrowReader`` and
  ``_CheckedLocalReader`` (a torch that stopped calling it fails the damaged-bytes tests in
  tests/test_checkpoint_integrity.py).
- ``PipelineStage._forward_metadata_inference``, overridden so that the shape-inference forward
  of a pipeline stage leaves its buffers (an MoE layer's token counts) as they were:
  raytitan/distributed/pipeline_schedule.py ``Stage`` (checked in tests/parallel/test_pipeline.py; a
  torch that stopped calling it fails the EP x PP parity in tests/parallel/test_expert_parallel.py).
- ``torch.cuda.memory._record_memory_history`` and ``torch.cuda.memory._snapshot`` (CUDA memory
  snapshots): raytitan/components/profiling.py ``CudaMemoryHistory``.
- ``torch._grouped_mm`` (grouped matmul of the MoE experts; tested in tests/models/test_moe.py):
  raytitan/models/moe.py ``grouped_mm``.
- ``torch.distributed._functional_collectives.all_to_all_single`` (autograd-aware all-to-all of
  the tokens under expert parallel; the public ``torch.distributed.nn.functional`` one is
  deprecated in its favour): raytitan/distributed/expert_parallel.py ``exchange``.
- ``torch._inductor.config._micro_pipeline_tp`` and
  ``torch.distributed._symmetric_memory.enable_symm_mem_for_group`` (async tensor parallel):
  raytitan/distributed/parallelize.py ``enable_async_tensor_parallel``.
- Not a name but a format: the keys of a flattened optimizer state dict
  (``state.<param>.<key>``, ``param_groups.<param>.<key>``), which
  raytitan/components/checkpoint/manager.py ``OptimizerState.plain_state_dict`` writes without
  building the state dict. It is checked against the built one at every full build (snapshots
  build in full, with a warning, when they disagree), and tests/test_snapshot_sources.py fails
  when that happens.

torchao 0.18
- ``torchao.float8._auto_filter_for_recipe``: raytitan/distributed/float8.py ``module_filter``.

Ray 2.60 (only under raytitan/ray/)
- ``ray.train.v2._internal.execution.context`` (its logger, named by its file, echoes every
  report): raytitan/ray/runtime.py ``report_echo_logger``.
- ``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator``
  (``get_or_create_autoscaling_coordinator`` and the actor's ``get_reserved_resources(requester_id,
  recompute)``): raytitan/ray/launcher.py ``autoscaling_coordinator``. The EP drill in
  tests/test_elastic.py (``CapacityClaim``, a stand-in for another job) also calls the actor's
  ``request_resources(requester_id, resources, expire_after_s, priority=ResourceRequestPriority.HIGH)``
  and ``cancel_request(requester_id)``.
- Ray Train's snapshot file name ``checkpoint_manager_snapshot.json``
  (``ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME``):
  raytitan/ray/launcher.py ``RAY_CHECKPOINT_LIST``.
- Ray Train's settings through environment variables, ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (set by raytitan/ray/launcher.py from
  ``ray.worker_group_start_timeout_s`` and ``ray.health_check_interval_s``) and
  ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (off unless set): their names are
  checked against ``ray.train.v2._internal.constants``, with the list of variables Ray Train
  passes on to its controller.
- A local Ray instance on 127.0.0.1 with token authentication: ``ray.init``'s hidden
  ``_node_ip_address`` option, ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (without it Ray
  turns 127.0.0.1 into the machine's outward address) and ``ray._raylet.Config.initialize`` (Ray
  reads ``RAY_AUTH_MODE`` when imported): raytitan/ray/launcher.py ``start_local_ray``,
  ``_loopback_node_address``, ``_switch_on_token_auth``.

Replaced by public API (checked here too, so they do not come back):
- ``LambdaLR._step_count`` / ``_last_lr``: raytitan/components/optimizer.py ``LRSchedulerState``
  sets the public ``last_epoch`` and calls ``step()``.
- A ``torch.optim.Optimizer`` subclass that skipped ``super().__init__`` (so one ``LambdaLR``
  could drive every pipeline part): ``PartOptimizers`` is a plain object and each part's optimizer
  has a ``LambdaLR`` of its own (``PartSchedulers``).

``test_the_package_uses_no_private_name_not_listed_here`` scans the package's source: a new
private name (or an override of another package's private method) fails it until it is added to
``USED`` (or ``OVERRIDDEN``) below, and to this list, with a check.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import warnings

import pytest
import torch
import torch.distributed as dist

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "raytitan"

# Per file: the private names (underscored imports and attributes of other packages) it uses.
USED = {
    "components/profiling.py": {"_record_memory_history", "_snapshot"},
    "distributed/activation_checkpoint.py": {
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper",
        "_scaled_mm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"},
    "distributed/context.py": {
        "torch.distributed.distributed_c10d._resolve_process_group",
        "torch.distributed.tensor.experimental._context_parallel._attention",
        "_templated_ring_attention", "_templated_ring_attention_backward", "_cp_options", "_RotateMethod",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"},
    "distributed/dims.py": {"_flatten"},
    "distributed/expert_parallel.py": {"torch.distributed._functional_collectives"},
    "distributed/float8.py": {"torchao.float8._auto_filter_for_recipe"},
    "models/moe.py": {"_grouped_mm"},
    "distributed/parallelize.py": {"torch._inductor.config", "_inductor", "_micro_pipeline_tp",
                                     "torch.distributed._symmetric_memory.enable_symm_mem_for_group"},
    "ray/launcher.py": {
        "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator.get_or_create_autoscaling_coordinator",
        "ray._private.ray_constants", "ray._raylet.Config"},
    "ray/runtime.py": {"ray.train.v2._internal.execution.context"},
}
# Per file: private methods of other packages' classes that a class of it overrides.
OVERRIDDEN = {"components/checkpoint/dcp_files.py": {"FileSystemReader._slice_file"},
              "distributed/pipeline_schedule.py": {"PipelineStage._forward_metadata_inference"}}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _package_names() -> set[str]:
    """Underscored names raytitan defines itself (functions, classes, variables, its own attributes)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if _private(n)}


def private_uses() -> dict[str, set[str]]:
    """Per file under raytitan/: underscored names of other packages it imports or reads."""
    own = _package_names()
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        uses = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
                if node.module.split(".")[0] == "raytitan":
                    continue
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if any(_private(part) for part in full.split(".")):
                        uses.add(full)
            elif isinstance(node, ast.Import):
                uses.update(a.name for a in node.names if any(_private(p) for p in a.name.split(".")))
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                uses.add(node.attr)
        if uses:
            found[str(path.relative_to(PACKAGE))] = uses
    return found


def _external(node: ast.expr, imported: dict[str, str]):
    """The class a base-class expression names, when it comes from another package (else None)."""
    import importlib

    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in imported:
        return None
    dotted = ".".join([imported[node.id], *parts])
    if dotted.split(".")[0] == "raytitan":
        return None
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def private_overrides() -> dict[str, set[str]]:
    """Per file under raytitan/: ``Base._method`` for each private method of another package's
    class that one of its classes overrides."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                imported.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                imported.update({a.asname or a.name.split(".")[0]: a.asname and a.name or a.name.split(".")[0]
                                 for a in node.names})
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            methods = [n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and _private(n.name)]
            for base in filter(None, (_external(b, imported) for b in cls.bases) if methods else ()):
                found.setdefault(str(path.relative_to(PACKAGE)), set()).update(
                    f"{base.__name__}.{m}" for m in methods if hasattr(base, m))
    return {f: names for f, names in found.items() if names}


def test_the_package_uses_no_private_name_not_listed_here():
    uses, overrides = private_uses(), private_overrides()  # each parses the whole package
    found = {f: uses.get(f, set()) | overrides.get(f, set()) for f in {*uses, *overrides}}
    listed = {f: USED.get(f, set()) | OVERRIDDEN.get(f, set()) for f in {*USED, *OVERRIDDEN}}
    new = {f: sorted(n - listed.get(f, set())) for f, n in found.items() if n - listed.get(f, set())}
    gone = {f: sorted(n - found.get(f, set())) for f, n in listed.items() if n - found.get(f, set())}
    assert not new, (f"private names of torch/torchao/Ray used but not listed in tests/test_private_apis.py: {new}; "
                     "use a public API, or isolate the use in one small function and add it to USED (or "
                     "OVERRIDDEN), the "
                     "module docstring and a check here")
    assert not gone, f"listed as used but no longer found (drop them from USED and the docstring): {gone}"


# --------------------------------------------------------------------------- replaced by public API


def _parts():
    from raytitan.components.optimizer import PartOptimizers, build_lr_scheduler
    from raytitan.config.job import JobConfig

    torch.manual_seed(0)
    parts = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    optimizer = PartOptimizers([torch.optim.SGD(parts[0].parameters(), lr=1.0),
                                torch.optim.SGD(parts[1].parameters(), lr=0.5)])
    config = JobConfig.from_dict({"lr_scheduler": {"warmup_steps": 2, "decay_type": "cosine"}})
    return optimizer, build_lr_scheduler(optimizer, config.lr_scheduler, total_steps=10)


def test_a_loaded_schedule_is_where_the_saved_one_was_through_public_api_only():
    from raytitan.components.optimizer import LRSchedulerState, PartOptimizers

    assert not isinstance(PartOptimizers([]), torch.optim.Optimizer)  # no Optimizer without its __init__
    optimizer, scheduler = _parts()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = LRSchedulerState(scheduler).state_dict()
    assert saved == {"last_epoch": 4}

    resumed_optimizer, resumed = _parts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's step-order warning is for training steps, not this one
        LRSchedulerState(resumed).load_state_dict(saved)
    assert resumed.last_epoch == 4 and resumed.get_last_lr() == scheduler.get_last_lr()
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed.get_last_lr()[1] == resumed.get_last_lr()[0] / 2  # each part on its own base lr
    for _ in range(3):  # and it goes on as the uninterrupted one does, without warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for o, s in ((optimizer, scheduler), (resumed_optimizer, resumed)):
                o.step()
                s.step()
        assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_the_step_order_warning_silenced_on_load_is_the_one_torch_gives():
    """If torch rewords it, the filter would let it through on every resume: fail here instead."""
    from raytitan.components.optimizer import STEP_ORDER_WARNING

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.warns(UserWarning, match=STEP_ORDER_WARNING):
        scheduler.step()


# --------------------------------------------------------------------------- torch


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (mesh and ring calls need a group)."""
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_device_mesh_flatten(one_rank_group):
    from torch.distributed.device_mesh import DeviceMesh

    from raytitan.distributed.dims import flatten_dims

    assert _params(DeviceMesh._flatten)[:2] == ["self", "mesh_dim_name"]
    mesh = DeviceMesh("cpu", torch.arange(1).view(1, 1), mesh_dim_names=("dp_shard", "cp"))
    flatten_dims(mesh, ("dp_shard", "cp"), "dp_shard_cp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that slicing a flattened dim from the root is deprecated
        flat = mesh["dp_shard_cp"]  # ParallelDims.submesh reads flattened dims this way
    assert flat.mesh_dim_names == ("dp_shard_cp",) and flat.size() == 1


def test_functional_all_to_all_is_differentiable(one_rank_group):
    from raytitan.distributed.expert_parallel import exchange

    x = torch.arange(6.0).view(3, 2).requires_grad_()
    y = exchange(x, [3], [3], one_rank_group)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0])).sum().backward()  # the gradient comes back by the reverse exchange
    assert torch.equal(x.grad, torch.tensor([[1.0, 2.0]] * 3))


def test_ring_attention_internals():
    from torch.distributed.tensor.experimental._context_parallel import _attention

    from raytitan.distributed.context import ROTATE_METHODS, _ring

    ring = _ring()
    assert ring.forward is _attention._templated_ring_attention
    assert ring.backward is _attention._templated_ring_attention_backward
    forward = inspect.signature(ring.forward).parameters
    assert list(forward)[:6] == ["group", "seq_dim", "op", "query", "key", "value"]
    assert "is_causal" in forward and inspect.Parameter.VAR_KEYWORD in [p.kind for p in forward.values()]
    backward = inspect.signature(ring.backward).parameters
    assert list(backward)[:3] == ["group", "seq_dim", "op"]
    for name in ("grad_out", "grad_out_name", "query", "key", "value", "out", "logsumexp", "is_causal"):
        assert name in backward, name
    assert set(ring.rotate_methods) == set(ROTATE_METHODS)
    assert all(isinstance(m, _attention._RotateMethod) for m in ring.rotate_methods.values())
    options = _attention._cp_options
    assert {"enable_load_balance", "rotate_method"} <= set(vars(options))


def test_ring_attention_runs_on_one_rank_and_restores_torchs_options(one_rank_group):
    """The private calls bind as called (forward and backward, both rotate methods), the group
    resolves by name, and the process-wide options are put back after each call."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    from raytitan.distributed.context import ROTATE_METHODS, RingAttention, _ring
    from raytitan.distributed.attention import CausalAttention

    assert _ring().group(one_rank_group.group_name) is one_rank_group
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, 8, 8, requires_grad=True) for heads in (4, 2, 2))
    full = CausalAttention()(q, k, v)
    grad_out = torch.randn_like(full)
    expected = torch.autograd.grad(full, (q, k, v), grad_out)
    before = vars(_attention._cp_options).copy()
    for method in ROTATE_METHODS:
        out = RingAttention(one_rank_group, method)(q, k, v)
        torch.testing.assert_close(out, full)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected):
            torch.testing.assert_close(got, want)
        assert vars(_attention._cp_options) == before


def _argument_names(op) -> set[str]:
    return {a.name for a in op._schema.arguments}


def test_aten_attention_kernels_take_the_arguments_they_are_given():
    from raytitan.distributed.context import KERNELS

    for kernel in KERNELS.values():
        assert {"query", "key", "value", "is_causal", "dropout_p"} <= _argument_names(kernel.forward)
        assert {"grad_out", "query", "key", "value", "out", "logsumexp", "is_causal",
                "dropout_p"} <= _argument_names(kernel.backward)
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    assert set(KERNELS["cuda"].backward_kwargs(q, k)) <= _argument_names(KERNELS["cuda"].backward)
    out, lse, *_ = KERNELS["cpu"].forward(q, k, k, is_causal=True, dropout_p=0.0)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True))
    assert lse.shape == (1, 2, 4)


def test_the_ops_per_op_checkpointing_keeps_exist():
    from raytitan.distributed.activation_checkpoint import SAVED_OPS

    aten = torch.ops.aten
    for name in ("_scaled_mm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        assert getattr(aten, name).default in SAVED_OPS, name
    # What F.scaled_dot_product_attention runs on CPU is one of them, so its output is kept.
    q = torch.randn(1, 2, 4, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.name for e in prof.events()}


def test_checkpoint_wrapper_keeps_state_dict_keys_and_takes_checkpoint_kwargs():
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    assert _params(checkpoint_wrapper)[:3] == ["module", "checkpoint_impl", "checkpoint_fn"]
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    keys = list(block.state_dict())
    policy = functools.partial(create_selective_checkpoint_contexts,
                               lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=policy)
    assert list(wrapped.state_dict()) == keys
    wrapped.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None


def test_dcp_reader_still_slices_through_slice_file(tmp_path):
    """dcp_files._ArrowReader overrides FileSystemReader._slice_file for one ranged read per item; a
    torch that stopped calling it would leave object-store reads correct but very slow."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from raytitan.components.checkpoint import dcp_files

    assert _params(FileSystemReader._slice_file) == ["self", "file", "sinfo"]
    assert "_slice_file" in vars(dcp_files._ArrowReader)
    calls = []

    class Counting(dcp_files._ArrowReader):
        def _slice_file(self, file, sinfo):
            calls.append(sinfo.length)
            return super()._slice_file(file, sinfo)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": one process is meant
        dcp.save({"w": torch.arange(6.0)}, storage_writer=dcp_files.writer(str(tmp_path)), no_dist=True)
        loaded = {"w": torch.zeros(6)}
        dcp.load(loaded, storage_reader=Counting(str(tmp_path)), no_dist=True)
    assert calls and torch.equal(loaded["w"], torch.arange(6.0))


def test_cuda_memory_history_calls():
    from torch.cuda import memory

    history = inspect.signature(memory._record_memory_history).parameters
    assert {"enabled", "max_entries"} <= set(history) and history["enabled"].default == "all"
    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(memory._snapshot).parameters.values())


def test_async_tensor_parallel_switches():
    import torch._inductor.config as inductor_config
    from torch._inductor.fx_passes import micro_pipeline_tp
    from torch.distributed import _symmetric_memory

    assert isinstance(inductor_config._micro_pipeline_tp, bool)
    with inductor_config.patch(_micro_pipeline_tp=True):  # a config name inductor knows
        assert inductor_config._micro_pipeline_tp is True
    assert _params(_symmetric_memory.enable_symm_mem_for_group) == ["group_name"]
    # Called although torch calls it deprecated: the micro-pipeline pass still skips the groups it was
    # not called for. When this fails, torch has dropped that check, and so can parallelize.py the call.
    assert "is_symm_mem_enabled_for_group" in inspect.getsource(micro_pipeline_tp)


# --------------------------------------------------------------------------- torchao


def test_torchao_auto_filter():
    from torchao.float8 import _auto_filter_for_recipe

    assert _params(_auto_filter_for_recipe) == ["recipe", "filter_fqns"]
    keep = _auto_filter_for_recipe("tensorwise", ["output"])
    big = torch.nn.Linear(4096, 2048, bias=False, device="meta")
    assert keep(big, "layers.0.feed_forward.w1")
    assert not keep(big, "output")  # named in filter_fqns
    assert not keep(torch.nn.Linear(64, 64, device="meta"), "layers.0.attention.wq")  # too small to gain
    assert callable(_auto_filter_for_recipe("rowwise", []))


# --------------------------------------------------------------------------- Ray


def test_ray_report_echo_logger():
    from ray.train.v2._internal.execution import context

    from raytitan.ray.runtime import report_echo_logger

    assert report_echo_logger() is context.logger  # the logger the report lines go through
    assert "Reporting training result" in inspect.getsource(context)  # the line it silences


def test_ray_autoscaling_coordinator():
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    assert _params(coordinator.get_or_create_autoscaling_coordinator) == []
    reserved = inspect.signature(coordinator._AutoscalingCoordinatorActor.get_reserved_resources).parameters
    assert list(reserved)[:3] == ["self", "requester_id", "recompute"]
    # What the EP drill's stand-in for another job calls (tests/test_elastic.py CapacityClaim).
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import ResourceRequestPriority

    request = inspect.signature(coordinator._AutoscalingCoordinatorActor.request_resources).parameters
    assert list(request)[:4] == ["self", "requester_id", "resources", "expire_after_s"] and "priority" in request
    # (once Ray has started, its tracing may append a _ray_trace_ctx parameter to actor methods)
    assert list(inspect.signature(coordinator._AutoscalingCoordinatorActor.cancel_request).parameters)[:2] == \
        ["self", "requester_id"]
    assert isinstance(request["priority"].default, ResourceRequestPriority) and hasattr(ResourceRequestPriority, "HIGH")


def test_ray_checkpoint_snapshot_file_name():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.execution.storage import StorageContext

    from raytitan.ray.launcher import RAY_CHECKPOINT_LIST

    assert RAY_CHECKPOINT_LIST == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    # ... kept in the experiment folder, which raytitan makes its run folder.
    source = inspect.getsource(StorageContext.checkpoint_manager_snapshot_path.fget)
    assert "self.experiment_fs_path, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME" in source


def test_ray_train_reads_the_variables_the_launcher_sets():
    from ray.train.v2._internal import constants

    from raytitan.ray.launcher import HEALTH_CHECK_VAR, PREEMPTION_WATCHER_VAR, START_TIMEOUT_VAR

    assert START_TIMEOUT_VAR == constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    assert HEALTH_CHECK_VAR == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert PREEMPTION_WATCHER_VAR == constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR
    # The driver sets them; the controller, another process, gets them only if Ray passes them on.
    assert {START_TIMEOUT_VAR, HEALTH_CHECK_VAR, PREEMPTION_WATCHER_VAR} <= set(constants.ENV_VARS_TO_PROPAGATE)


def test_ray_local_instance_on_loopback_with_token_auth():
    """What start_local_ray relies on: a 127.0.0.1 node address is turned into the outward one
    unless ENABLE_RAY_CLUSTER is off; ray.init passes _node_ip_address through that; Ray switches
    token auth on by setting RAY_AUTH_MODE and re-reading its config with Config.initialize."""
    from ray._private import ray_constants, services, worker
    from ray._private.authentication import authentication_token_setup
    from ray._raylet import Config

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address)
    assert "get_node_ip_address()" in inspect.getsource(services.resolve_ip_for_localhost)
    init = inspect.getsource(worker.init)
    assert 'kwargs.pop("_node_ip_address"' in init and "resolve_ip_for_localhost(_node_ip_address)" in init
    assert callable(Config.initialize)
    assert 'Config.initialize("")' in inspect.getsource(authentication_token_setup._enable_token_auth)
    assert authentication_token_setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
