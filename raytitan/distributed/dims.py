"""ParallelDims: every parallel degree in one place, validated once, and the named DeviceMesh.

Expert parallel borrows its ranks from the data-parallel shard dimension: with ``ep`` > 1 the
mesh has no ``dp_shard`` dimension of its own but two, ``efsdp`` x ``ep`` (ep innermost), and
``dp_shard`` is their flattened view, so everything that asks for ``dp_shard`` (FSDP of the
dense weights, data rows, loss reduction) sees the same ranks as without expert parallel. Experts
are split over ``ep`` and their weights FSDP-sharded over ``efsdp`` (and replicated over
``dp_replicate`` under HSDP). Pipeline and tensor parallel take their ranks first (the mesh is
``pp, dp_replicate, efsdp, ep, cp, tp``); context parallel does not combine with expert parallel.
Under tensor parallel a flattened ``dp_shard_tp`` view is added: the FSDP mesh of the modules that
run on each tp rank's own sequence shard (``sequence_local_mesh``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh


# Flattened views of several mesh dimensions, by what they are for. A part may itself be a
# flattened view (``dp_shard`` under expert parallel): it stands for the dimensions it covers.
FLATTENED = {
    "dp_shard": ("efsdp", "ep"),  # only with expert parallel; else dp_shard is a mesh dimension
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    # Only with tensor parallel: the FSDP mesh of the modules that run on each tensor-parallel
    # rank's own sequence shard (an MoE layer's router and shared experts), whose gradients sum
    # over the tp ranks as well.
    "dp_shard_tp": ("dp_shard", "tp"),
}


class ParallelismError(ValueError):
    """Degrees that cannot form a mesh on the given world size."""


def flatten_dims(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> None:
    """Add to ``mesh`` one dimension ``name`` over the ranks of ``dims`` together (``mesh[name]``).

    torch has no public API for it: this is the one call of the private ``DeviceMesh._flatten``
    (torch 2.13, as torchtitan uses it); tests/test_private_apis.py checks it."""
    mesh[dims]._flatten(name)


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int  # -1: whatever the other degrees leave
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1  # expert parallel: ranks of the dp_shard dimension that split the experts

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelismError(f"{self._key(name)} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ParallelismError(f"{self._key('dp_shard')} must be -1 (fill) or >= 1, got {self.dp_shard}")
        block = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % block:
                raise ParallelismError(
                    f"world size {self.world_size} is not divisible by replicate x cp x tp x pp = {block}; "
                    "change the degrees or the number of workers"
                )
            self.dp_shard = self.world_size // block
        if block * self.dp_shard != self.world_size:
            raise ParallelismError(
                f"replicate({self.dp_replicate}) x shard({self.dp_shard}) x cp({self.cp}) x tp({self.tp}) x "
                f"pp({self.pp}) = {block * self.dp_shard}, but the world size is {self.world_size}; "
                "set parallelism.data_parallel_shard_degree = -1 to fill, or change ray.num_workers"
            )
        if self.ep > 1:
            if self.cp > 1:
                raise ParallelismError(
                    f"{self._key('ep')} = {self.ep} does not combine with {self._key('cp')} = {self.cp} (the MoE "
                    "layers would route each rank's share of a sequence, and ring attention reorders the sequence "
                    f"over the context-parallel ranks; not built): set {self._key('ep')} = 1, or {self._key('cp')} = 1")
            if self.dp_shard % self.ep:
                raise ParallelismError(
                    f"{self._key('ep')} = {self.ep} does not divide the data-parallel shard degree {self.dp_shard} "
                    f"(expert parallel borrows its ranks from {self._key('dp_shard')}): pick a divisor of "
                    f"{self.dp_shard}, or change ray.num_workers")

    @staticmethod
    def _key(name: str) -> str:
        keys = {
            "dp_replicate": "data_parallel_replicate_degree",
            "dp_shard": "data_parallel_shard_degree",
            "cp": "context_parallel_degree",
            "tp": "tensor_parallel_degree",
            "pp": "pipeline_parallel_degree",
            "ep": "expert_parallel_degree",
        }
        return f"parallelism.{keys[name]}"

    @classmethod
    def from_config(cls, parallelism, world_size: int) -> ParallelDims:
        return cls(
            dp_replicate=parallelism.data_parallel_replicate_degree,
            dp_shard=parallelism.data_parallel_shard_degree,
            cp=parallelism.context_parallel_degree,
            tp=parallelism.tensor_parallel_degree,
            pp=parallelism.pipeline_parallel_degree,
            world_size=world_size,
            ep=parallelism.expert_parallel_degree,
        )

    @property
    def efsdp(self) -> int:
        """The data-parallel shard ranks that hold the same experts (over which their weights are
        FSDP-sharded): dp_shard / ep."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct slices of each global batch there are."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Named mesh over the enabled dims (pp, dp_replicate, dp_shard, cp, tp), plus flattened
        views where more than one dim takes part: 'dp' (data rows), 'dp_shard_cp' (FSDP
        sharding) and 'dp_cp' (loss and token counts). With expert parallel dp_shard is split
        into 'efsdp' x 'ep' (both kept, even efsdp of size 1: the experts' FSDP needs its mesh)
        and 'dp_shard' is their flattened view."""
        shard = [("efsdp", self.efsdp), ("ep", self.ep)] if self.ep > 1 else [("dp_shard", self.dp_shard)]
        dims = [
            ("pp", self.pp),
            ("dp_replicate", self.dp_replicate),
            *shard,
            ("cp", self.cp),
            ("tp", self.tp),
        ]
        # A world of one still gets a one-dim mesh so collectives have a group.
        names = [n for n, d in dims if d > 1 or (self.ep > 1 and n == "efsdp")] or ["dp_shard"]
        shape = [d for n, d in dims if n in names]
        # Over ranks 0..world_size-1 of the process group: in an elastic world the ranks
        # beyond the layout are not in the mesh (their coordinate is None) and idle.
        # Every rank must still call this: creating the mesh's groups is collective.
        ranks = torch.arange(self.world_size).view(*shape)
        mesh = DeviceMesh(device_type, ranks, mesh_dim_names=tuple(names))
        done = set()
        for flat in FLATTENED:
            present = _present(mesh, flat)
            if len(present) > 1 and present not in done:  # each set of dims flattened once
                flatten_dims(mesh, present, flat)
                done.add(present)
        return mesh

    @staticmethod
    def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh | None:
        """The 1-D mesh over dimension ``name`` (or a flattened one), None when it is absent or of size 1."""
        names = mesh.mesh_dim_names or ()
        if name in FLATTENED and name not in names:
            present = _present(mesh, name)
            if len(present) > 1:
                return mesh[_flat_name(mesh, present)]
            return mesh[present[0]] if present else None
        return mesh[name] if name in names and mesh[name].size() > 1 else None

    @staticmethod
    def expert_fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
        """Where the expert weights are FSDP-sharded under expert parallel: 'efsdp' (HSDP:
        ('dp_replicate', 'efsdp')), kept even when of size 1; None without expert parallel."""
        names = mesh.mesh_dim_names or ()
        if "ep" not in names:
            return None
        return mesh["dp_replicate", "efsdp"] if "dp_replicate" in names else mesh["efsdp"]

    @staticmethod
    def sequence_local_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
        """Under tensor parallel, where the modules that run on each tp rank's own sequence shard
        (an MoE layer: ``raytitan.distributed.parallelize.mark_sequence_local``) are FSDP-sharded:
        over the data-parallel shard ranks and the tp ranks together (('dp_replicate', that) under
        HSDP). Every rank of it saw distinct tokens, so FSDP's reduce-scatter sums their gradients
        as one process's would be. None without tensor parallel. (Their experts under expert
        parallel are DTensors over ('ep', 'tp') instead: ``raytitan.distributed.expert_parallel``.)"""
        names = mesh.mesh_dim_names or ()
        if "tp" not in names or mesh["tp"].size() == 1:
            return None
        shard = ParallelDims.submesh(mesh, "dp_shard_tp")  # never None: it covers tp
        if "dp_replicate" in names:
            return mesh["dp_replicate", shard.mesh_dim_names[0]]
        return shard

    @staticmethod
    def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
        """1-D shard mesh for FSDP, 2-D (replicate, shard) mesh for HSDP, None when not sharding.

        Context-parallel ranks hold the same parameters and see different tokens, so FSDP shards
        over them too: their gradients must be summed like those of data-parallel ranks."""
        names = mesh.mesh_dim_names or ()
        shard = ParallelDims.submesh(mesh, "dp_shard_cp")
        if "dp_replicate" in names:
            if shard is None:
                return mesh["dp_replicate"]
            return mesh["dp_replicate", shard.mesh_dim_names[0]]  # dp_shard, cp or flattened dp_shard_cp
        return shard

    @cached_property
    def summary(self) -> str:
        ep = f" (experts: ep {self.ep} x efsdp {self.efsdp})" if self.ep > 1 else ""
        return (
            f"world {self.world_size} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} "
            f"x cp {self.cp} x tp {self.tp} x pp {self.pp}{ep}"
        )


def _expand(name: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh dimensions a (possibly flattened) name covers, in mesh order."""
    if name in names or name not in FLATTENED:
        return (name,)
    return tuple(d for part in FLATTENED[name] for d in _expand(part, names))


def _present(mesh: DeviceMesh, name: str) -> tuple[str, ...]:
    """The mesh dimensions of size > 1 that ``name`` covers."""
    names = mesh.mesh_dim_names or ()
    return tuple(n for n in _expand(name, names) if n in names and mesh.size(names.index(n)) > 1)


def _flat_name(mesh: DeviceMesh, present: tuple[str, ...]) -> str:
    """The name under which ``build_mesh`` flattened these dimensions (the first that covers them)."""
    return next(flat for flat in FLATTENED if _present(mesh, flat) == present)
