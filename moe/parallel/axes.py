"""Logical axis names and the one table that maps them onto mesh axes.

Parameters and activations are named with *logical* axes at creation (``out_sharding=('expert',
'embed', 'mlp')``); this table decides which *mesh* axes (``data``, ``expert``, ``model``) each
one is split over. Changing a parallelism strategy means changing this table, not the layers.

=============  ======================  =====================================================
logical axis   mesh axes               why
=============  ======================  =====================================================
``batch``      ``('data', 'expert')``  outside MoE blocks the expert axis is one more data axis
``length``     ``None``                sequences are not split
``embed``      ``None``                d_model stays whole (no FSDP here)
``mlp``        ``'model'``             feed-forward / expert hidden split for tensor parallelism
``heads``      ``'model'``             attention heads split for tensor parallelism
``kv``         ``None``                per-head width stays whole
``vocab``      ``'model'``             embedding / logits split over the model axis
``expert``     ``'expert'``            each expert-axis device holds ``E / EP`` experts
``None``       ``None``                replicated
=============  ======================  =====================================================

Mesh axes of size 1, and axes the mesh does not have, are dropped when a spec is built, so the
same table serves a 1-device run, a ``(data, expert)`` mesh and a ``(data, expert, model)`` mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "expert", "model")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),
    "length": (),
    "embed": (),
    "mlp": ("model",),
    "heads": ("model",),
    "kv": (),
    "vocab": ("model",),
    "expert": ("expert",),
}


def mesh_axes_for(name: str | None, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes that logical axis ``name`` is split over on ``mesh`` (size-1 / absent dropped)."""
    if name is None:
        return ()
    if name not in RULES:
        raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(RULES)}")
    return tuple(a for a in RULES[name] if mesh.shape.get(a, 1) > 1)


def logical_to_mesh(names: Sequence[str | None] | None, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry logical ``names``.

    >>> logical_to_mesh(("expert", "embed", "mlp"), mesh)  # mesh (data=2, expert=4)
    PartitionSpec('expert', None, None)

    A mesh axis is used at most once per spec (the first dim that asks for it gets it).
    """
    if names is None:
        return PartitionSpec()
    used: set[str] = set()
    parts: list[str | tuple[str, ...] | None] = []
    for name in names:
        axes = tuple(a for a in mesh_axes_for(name, mesh) if a not in used)
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def spec_to_str(spec: PartitionSpec) -> str:
    """A PartitionSpec as plain text for golden files: ``"('data','expert'), None"``; ``""``
    for a fully replicated array."""

    def one(p) -> str:
        if p is None:
            return "None"
        if isinstance(p, tuple):
            return "(" + ",".join(repr(a) for a in p) + ")"
        return repr(p)

    return ", ".join(one(p) for p in spec)


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill in a ``-1`` axis so the sizes multiply to ``num_devices``; ordered as MESH_AXES.

    ``data`` and ``expert`` are always present (size 1 if not given); ``model`` only if given.
    """
    unknown = set(mesh_shape) - set(MESH_AXES)
    if any(s == 0 or s < -1 for s in mesh_shape.values()):
        raise ValueError(
            f"mesh {dict(mesh_shape)}: axis sizes must be positive (or -1 for the rest)"
        )
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
