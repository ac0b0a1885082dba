"""The expert exchange: an MoE layer over the mesh with two explicit all-to-alls.

Inside ``jax.shard_map`` over the whole mesh, with tokens split over ``('data', 'expert')`` and
the ``E`` experts split over ``expert`` (``EP`` devices, ``E' = E / EP`` experts each)::

    x_l [b, s, d] -> x_td [T_l, d]       each device's own tokens (T_l = T / (data * EP))
    route(x_td) -> Routing               slot_token [E, C_l], capacity C_l from T_l
    dispatch                             -> send [E, C_l, d]
    all_to_all(expert, split E, concat C)-> recv [E', EP * C_l, d]   (GShard §3.2 AllToAll)
    experts(local weights, recv)         -> [E', EP * C_l, d]
    all_to_all back (split C, concat E)  -> [E, C_l, d]
    combine                              -> y_td [T_l, d]            each device its own tokens

This is GShard's *local group dispatching* (Lepikhin et al. 2020 §2.2): each device's tokens are
one routing group with capacity computed from its own ``T_l`` tokens, so the result equals the
single-device layer applied group by group (``tests/parallel/test_expert_parallel.py``). Aux
losses and stats are averaged over the groups (``pmean``), GShard's per-group loss averaged.
The all-to-all time grows ~O(sqrt(D)) on a 2D torus (GShard §5, papers §2.4; ``pod/cost.py``).

With a ``model`` axis, tokens are replicated over it and the expert hidden dim ``f`` is split;
``experts`` then returns a partial sum over ``f`` that must be ``psum``-ed over ``model``
(``psum_model``). Random routing/dropout keys are folded with the group index (data-major),
so group ``g`` of the reference uses ``fold_in(key, g)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from moe.routing.dispatch import combine, dispatch
from moe.routing.result import Routing, RoutingAux

TOKEN_AXES = ("data", "expert")


def token_groups(mesh: Mesh | AbstractMesh | None) -> int:
    """Routing groups under expert parallelism: one per ``(data, expert)`` device (1 with no
    mesh)."""
    if mesh is None or mesh.empty:
        return 1
    return mesh.shape.get("data", 1) * mesh.shape.get("expert", 1)


def to_experts(send_ecd: jax.Array, axis: str = "expert") -> jax.Array:
    """``[E, C, d] -> [E / EP, EP * C, d]``: chunk ``j`` of the experts goes to device ``j``;
    received rows are source-device-major. Call inside ``shard_map``."""
    return jax.lax.all_to_all(send_ecd, axis, split_axis=0, concat_axis=1, tiled=True)


def from_experts(recv_ecd: jax.Array, axis: str = "expert") -> jax.Array:
    """``[E / EP, EP * C, d] -> [E, C, d]``, the inverse of :func:`to_experts`."""
    return jax.lax.all_to_all(recv_ecd, axis, split_axis=1, concat_axis=0, tiled=True)


def psum_model(y: jax.Array) -> jax.Array:
    """Sum partial expert outputs over the ``model`` axis when the ambient mesh has one > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.shape.get("model", 1) > 1:
        return jax.lax.psum(y, "model")
    return y


def moe_exchange(
    x: jax.Array,
    *,
    mesh: Mesh | AbstractMesh,
    route: Callable[[jax.Array, Any, jax.Array | None], Routing],
    experts: Callable[[Any, jax.Array, jax.Array | None], jax.Array],
    expert_params: Any,
    expert_specs: Any,
    extras: Any = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, RoutingAux]:
    """An MoE layer with the expert all-to-all exchange (module docstring).

    Args:
      x: ``[B, ..., d]`` tokens, rows ``B`` divisible by ``data * expert``.
      mesh: mesh (or abstract mesh) with axes ``data``, ``expert`` (> 1) and maybe ``model``.
      route: ``(x_td [T_l, d], extras_td, keys) -> Routing`` for one group; closes over the
        (replicated) router weights. ``extras_td`` is ``extras`` with its leading ``[b, ...]``
        dims flattened like ``x``; ``keys`` is ``key`` folded with the group index.
      experts: ``(params_local, recv [E', N, d], keys) -> [E', N, d]`` (``psum_model`` it if
        the hidden dim is split over ``model``).
      expert_params: pytree of arrays with leading dim E; expert_specs: their PartitionSpecs.
      extras: pytree of per-token arrays shaped like ``x``'s leading dims (masks, router bias).
      key: a PRNG key, a pytree of them, or None; group ``g`` gets each ``fold_in(k, g)``.

    Returns:
      ``(y [B, ..., d] float32, RoutingAux)``, the aux losses and stats averaged over the
      routing groups (``capacity``: slots per expert per group); per-token stats
      (``token_*``) are not averaged but returned ``[B, ..., ...]`` like ``y``.
    """
    axes = tuple(a for a in TOKEN_AXES if a in mesh.shape)
    lead = x.ndim - 1

    def body(x_l, extras_l, params_l, key_l):
        num_tokens = x_l.size // x_l.shape[-1]
        x_td = x_l.reshape(num_tokens, x_l.shape[-1])  # [T_l, d]
        extras_td = jax.tree.map(lambda a: a.reshape(num_tokens, *a.shape[lead:]), extras_l)
        group = jax.lax.axis_index(axes)
        keys = jax.tree.map(lambda k: jax.random.fold_in(k, group), key_l)
        routing = route(x_td, extras_td, keys)
        send = dispatch(x_td, routing.slot_token)  # [E, C_l, d]
        recv = to_experts(send)  # [E', EP * C_l, d]
        out = from_experts(experts(params_l, recv, keys))  # [E, C_l, d]
        y_td = combine(out, routing.slot_token, routing.slot_weight, num_tokens)  # [T_l, d]
        aux, per_token = routing.aux().split_per_token()  # per-token stats travel like x
        aux = jax.tree.map(lambda s: jax.lax.pmean(s.astype(jnp.float32), axes), aux)
        per_token = {k: v.reshape(*x_l.shape[:-1], *v.shape[1:]) for k, v in per_token.items()}
        return y_td.reshape(*x_l.shape[:-1], y_td.shape[-1]), aux, per_token

    tokens = PartitionSpec(axes)
    extras_specs = jax.tree.map(lambda _: tokens, extras)
    y, aux, per_token = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, extras_specs, expert_specs, jax.tree.map(lambda _: PartitionSpec(), key)),
        out_specs=(tokens, PartitionSpec(), tokens),
    )(x, extras, expert_params, key)
    return y, RoutingAux(aux.aux_loss, aux.z_loss, {**aux.stats, **per_token})
