"""The device mesh for a pod slice, and the shardings of parameters and batches on it.

Mesh axes are ``('data', 'expert'[, 'model'])`` (docs/ARCHITECTURE.md §Parallelism). Devices are
laid out by ``jax.make_mesh``, which follows the physical topology on TPU/GPU; on the simulated
pod (virtual CPU devices) it keeps device order, which ``pod.topology.device_coords`` reads as
row-major chip coordinates, so the innermost mesh axis (``expert``) lies along neighbouring chips.
Axes are ``Auto`` (GSPMD-style): shardings are annotations, the compiler inserts collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moe.parallel.axes import MESH_AXES, logical_to_mesh, spec_to_str


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill in a ``-1`` axis so the sizes multiply to ``num_devices``; ordered as MESH_AXES.

    ``data`` and ``expert`` are always present (size 1 if not given); ``model`` only if given.
    """
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)[0]!r}; axes are data, expert, model")
    sizes = {"data": mesh_shape.get("data", 1), "expert": mesh_shape.get("expert", 1)}
    if "model" in mesh_shape:
        sizes["model"] = mesh_shape["model"]
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {dict(mesh_shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh {dict(mesh_shape)} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} uses {math.prod(sizes.values())} devices but there are {num_devices}"
        )
    return sizes


def build_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'expert'[, 'model'])`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_shape, len(devices))
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


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per leaf, same tree structure (usable as jit ``out_shardings``)."""
    specs = param_specs(abstract_state, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def param_specs_as_strings(abstract_state: Any, mesh: Mesh) -> dict[str, str]:
    """``{"layers/0/moe/w_in": "'expert', None, 'model'"}``: partition specs as plain text,
    for golden sharding files (JSON)."""
    specs = param_specs(abstract_state, mesh)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    out = {}
    for path, spec in flat:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        out[name.removesuffix("/value")] = spec_to_str(spec)
    return out


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Batch arrays ``[B, ...]``: rows split over ``('data', 'expert')`` (size-1 axes dropped)."""
    spec = logical_to_mesh(("batch",) + (None,) * (ndim - 1), mesh)
    return NamedSharding(mesh, spec)


def check_divisible(
    num_experts: int,
    mesh: Mesh,
    batch_size: int,
    *,
    d_ff: int | None = None,
    num_heads: int | None = None,
    vocab_size: int | None = None,
    processes: int = 1,
) -> list[str]:
    """Messages (empty when all is well) for sizes that do not divide over the mesh, e.g.
    ``"moe.num_experts=60 is not divisible by the expert axis (8); ..."``."""
    shape = dict(mesh.shape)
    ep, tp = shape.get("expert", 1), shape.get("model", 1)
    rows = shape.get("data", 1) * ep
    out = []
    if num_experts % ep:
        out.append(
            f"moe.num_experts={num_experts} is not divisible by the expert axis ({ep}); "
            "change moe.num_experts or pod.mesh.expert"
        )
    if batch_size % rows:
        out.append(
            f"train.batch_size={batch_size} is not divisible by the data x expert devices "
            f"({rows}); each device routes its own rows"
        )
    if batch_size % processes:
        out.append(
            f"train.batch_size={batch_size} is not divisible by pod.processes={processes}; "
            "each process feeds an equal share of rows"
        )
    for key, value in (("model.d_ff", d_ff), ("model.num_heads", num_heads)):
        if value is not None and value % tp:
            out.append(f"{key}={value} is not divisible by the model axis ({tp})")
    if vocab_size is not None and vocab_size % tp:
        out.append(f"model.vocab_size={vocab_size} is not divisible by the model axis ({tp})")
    return out


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh) -> Any:
    """Run ``init_fn`` (no arguments; returns an ``nnx.Module``) so that every parameter is born
    with its sharding: shapes from ``nnx.eval_shape``, then one jitted init with
    ``out_shardings`` (big_vision/MaxText habit; nothing is materialised on one device first).
    """
    abstract = nnx.eval_shape(init_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh)

    make = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)
    return nnx.merge(graphdef, make())
