"""ParallelDims: every parallel degree in one place, validated once, and the named DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh


# Flattened views of several mesh dimensions, by what they are for.
FLATTENED = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
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

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp"):
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

    @staticmethod
    def _key(name: str) -> str:
        keys = {
            "dp_replicate": "data_parallel_replicate_degree",
            "dp_shard": "data_parallel_shard_degree",
            "cp": "context_parallel_degree",
            "tp": "tensor_parallel_degree",
            "pp": "pipeline_parallel_degree",
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
        )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct slices of each global batch there are."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Named mesh over the enabled dims (pp, dp_replicate, dp_shard, cp, tp), plus flattened
        views where more than one dim takes part: 'dp' (data rows), 'dp_shard_cp' (FSDP
        sharding) and 'dp_cp' (loss and token counts)."""
        dims = [
            ("pp", self.pp),
            ("dp_replicate", self.dp_replicate),
            ("dp_shard", self.dp_shard),
            ("cp", self.cp),
            ("tp", self.tp),
        ]
        # A world of one still gets a one-dim mesh so collectives have a group.
        names = [n for n, d in dims if d > 1] or ["dp_shard"]
        shape = [d for n, d in dims if n in names]
        # Over ranks 0..world_size-1 of the process group: in an elastic world the ranks
        # beyond the layout are not in the mesh (their coordinate is None) and idle.
        # Every rank must still call this: creating the mesh's groups is collective.
        ranks = torch.arange(self.world_size).view(*shape)
        mesh = DeviceMesh(device_type, ranks, mesh_dim_names=tuple(names))
        for flat, parts in FLATTENED.items():
            present = tuple(n for n in parts if n in names)
            if len(present) > 1:
                flatten_dims(mesh, present, flat)
        return mesh

    @staticmethod
    def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh | None:
        """The 1-D mesh over dimension ``name`` (or a flattened one), None when it is absent or of size 1."""
        names = mesh.mesh_dim_names or ()
        if name in FLATTENED:
            present = [n for n in FLATTENED[name] if n in names and mesh[n].size() > 1]
            if len(present) > 1:
                return mesh[name]
            return mesh[present[0]] if present else None
        return mesh[name] if name in names and mesh[name].size() > 1 else None

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
        return (
            f"world {self.world_size} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} "
            f"x cp {self.cp} x tp {self.tp} x pp {self.pp}"
        )
