"""The device mesh for a pod slice, and the shardings of parameters and batches on it.

Mesh axes are ``('data', 'expert'[, 'model'])`` (docs/ARCHITECTURE.md §Parallelism). Devices are
laid out by ``jax.make_mesh``, which follows the physical topology on TPU/GPU; on the simulated
pod (virtual CPU devices) it keeps device order, which ``pod.topology.device_coords`` reads as
row-major chip coordinates, so the innermost mesh axis (``expert``) lies along neighbouring chips.
Axes are ``Auto`` (GSPMD-style): shardings are annotations, the compiler inserts collectives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moe.parallel.axes import logical_to_mesh, resolve_mesh_shape, spec_to_str


def build_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'expert'[, 'model'])`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_shape, len(devices))  # the one resolution (axes.py)
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def _logical_names(leaf: Any) -> tuple[str | None, ...] | None:
    if isinstance(leaf, nnx.Variable):
        return leaf.get_metadata().get("out_sharding") or None
    return None


def _check_dims(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, part in zip(shape, spec):
        axes = () if part is None else (part,) if isinstance(part, str) else part
        ways = math.prod(mesh.shape[a] for a in axes)
        if dim % ways:
            raise ValueError(
                f"parameter {path} has a dim of {dim}, not divisible by mesh axes {axes} ({ways})"
            )


def param_specs(abstract_state: Any, mesh: Mesh) -> Any:
    """PartitionSpec per leaf of ``abstract_state`` (an ``nnx.State`` or a pytree), from the
    logical names in each ``nnx.Variable``'s ``out_sharding`` metadata; plain arrays and
    unnamed variables are replicated. Raises ``ValueError`` naming a parameter whose dim does
    not divide over its mesh axes."""

    def one(path, leaf):
        spec = logical_to_mesh(_logical_names(leaf), mesh)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        shape = getattr(value, "shape", ())
        _check_dims(jax.tree_util.keystr(path, simple=True, separator="/"), shape, spec, mesh)
        return leaf.replace(spec) if isinstance(leaf, nnx.Variable) else spec

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """A pytree of PartitionSpecs as ``NamedSharding``s on ``mesh`` (same structure, usable as
    jit ``out_shardings``)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def specs_as_strings(specs: Any, prefix: str = "") -> dict[str, str]:
    """``{"<prefix>/layers/0/moe/w_in": "'expert', None, 'model'"}``: a pytree of
    PartitionSpecs as plain text by tree path, for golden sharding files (JSON)."""
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    out = {}
    for path, spec in flat:
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        out[f"{prefix}/{name}" if prefix else name] = spec_to_str(spec)
    return out


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Batch arrays ``[B, ...]``: rows split over ``('data', 'expert')`` (size-1 axes dropped)."""
    spec = logical_to_mesh(("batch",) + (None,) * (ndim - 1), mesh)
    return NamedSharding(mesh, spec)
