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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from moe.parallel.axes import logical_to_mesh
from moe.routing.result import Routing

TOKEN_AXES = ("data", "expert")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExchangeAux:
    """Router outputs averaged over the routing groups (devices).

    aux_loss, z_loss: float32 scalars (mean over groups of each group's unweighted loss).
    stats: dict of float32 arrays, each the mean over groups of the group's statistic.
    capacity: float32 scalar, slots per expert per group (C_l).
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    stats: dict[str, jax.Array]
    capacity: jax.Array


def expert_mesh() -> AbstractMesh | None:
    """The mesh set with ``jax.set_mesh`` if it is ours (has an ``expert`` axis) and splits
    tokens over more than one device, else None.

    A pure data-parallel mesh (``expert`` = 1) qualifies too: each device then routes its own
    rows and the all-to-all over the size-1 axis moves nothing. The alternative, one routing
    group over the whole batch partitioned by the compiler, is an order of magnitude slower
    (its sort, cumsum and gathers span devices; ``scripts/bench_parallel.py`` history).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.shape or token_groups(mesh) <= 1:
        return None
    return mesh


def token_groups(mesh: Mesh | AbstractMesh) -> int:
    """Routing groups under expert parallelism: one per ``(data, expert)`` device."""
    return mesh.shape.get("data", 1) * mesh.shape.get("expert", 1)


def can_exchange(mesh: Mesh | AbstractMesh | None, batch: int, num_experts: int) -> bool:
    """Whether a batch of ``batch`` rows can take the exchange path on ``mesh``."""
    if mesh is None or "expert" not in mesh.shape or token_groups(mesh) <= 1:
        return False
    return batch % token_groups(mesh) == 0 and num_experts % mesh.shape["expert"] == 0


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


def specs_from_logical(names: Any, mesh: Mesh | AbstractMesh) -> Any:
    """Map a pytree of logical-name tuples to PartitionSpecs (``axes.logical_to_mesh``)."""
    return jax.tree.map(
        lambda n: logical_to_mesh(n, mesh), names, is_leaf=lambda n: isinstance(n, tuple)
    )


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
    dispatch: Callable | None = None,
    combine: Callable | None = None,
) -> tuple[jax.Array, ExchangeAux]:
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
      dispatch, combine: default ``moe.layers.moe.dispatch`` / ``combine``.

    Returns:
      ``(y [B, ..., d] float32, ExchangeAux)``.
    """
    if dispatch is None or combine is None:
        from moe.layers.moe import combine as _combine
        from moe.layers.moe import dispatch as _dispatch

        dispatch, combine = dispatch or _dispatch, combine or _combine
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
        aux = ExchangeAux(
            aux_loss=jax.lax.pmean(routing.aux_loss, axes),
            z_loss=jax.lax.pmean(routing.z_loss, axes),
            stats=jax.tree.map(lambda s: jax.lax.pmean(s.astype(jnp.float32), axes), routing.stats),
            capacity=jnp.float32(routing.capacity),
        )
        return y_td.reshape(*x_l.shape[:-1], y_td.shape[-1]), aux

    tokens = PartitionSpec(axes)
    extras_specs = jax.tree.map(lambda _: tokens, extras)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, extras_specs, expert_specs, jax.tree.map(lambda _: PartitionSpec(), key)),
        out_specs=(tokens, PartitionSpec()),
    )(x, extras, expert_params, key)


def block_exchange(
    block: Any,
    x: jax.Array,
    mesh: Mesh | AbstractMesh,
    *,
    train: bool,
    rngs=None,
    **masks: jax.Array | None,
) -> tuple[jax.Array, Any]:
    """``moe.layers.moe.MoeBlock`` through the exchange: ``x [B, S, d] -> (y_td [T, d] float32,
    MoeAux)``; ``masks`` are the block's ``token_mask``, ``expert_mask``, ``router_bias``.

    Router rngs (jitter, noise, random policy) and expert dropout draw one key each from
    ``rngs`` here, outside ``shard_map``; each group folds in its index.
    """
    from flax import nnx

    from moe.layers.experts import apply_experts
    from moe.layers.moe import MoeAux

    spec, bank = block.spec, block.experts
    extras = {k: v for k, v in masks.items() if v is not None}
    keys = {}
    needs_router = (
        spec.jitter > 0
        or spec.router == "noisy"
        or (spec.second_expert_policy == "random" and spec.top_k > 1)
    )
    if train and rngs is not None and needs_router:
        keys["router"] = rngs.router()
    if train and rngs is not None and bank.dropout_rate > 0:
        keys["dropout"] = rngs.dropout()
    names = ("w_in", "b_in", "w_out", "b_out")
    variables = {n: getattr(bank, n) for n in names}
    params = {n: v[...] for n, v in variables.items()}
    specs = {
        n: logical_to_mesh(v.get_metadata().get("out_sharding"), mesh) for n, v in variables.items()
    }
    split_hidden = mesh.shape.get("model", 1) > 1

    def route(x_td, extras_td, keys_l):
        router_rngs = nnx.Rngs(router=keys_l["router"]) if "router" in keys_l else None
        return block.route(x_td, train=train, rngs=router_rngs, **extras_td)

    def experts(p, recv, keys_l):
        b_out = jnp.zeros_like(p["b_out"]) if split_hidden else p["b_out"]
        y = apply_experts(
            p["w_in"], p["b_in"], p["w_out"], b_out, recv,
            activation=bank.activation, dtype=bank.dtype, dropout=bank.dropout_rate,
            dropout_key=keys_l.get("dropout"),
        )  # fmt: skip
        if split_hidden:  # partial sums over the hidden units of this model shard
            y = psum_model(y) + p["b_out"].astype(y.dtype)[:, None, :]
        return y

    y, aux = moe_exchange(
        x, mesh=mesh, route=route, experts=experts, expert_params=params,
        expert_specs=specs, extras=extras, key=keys,
    )  # fmt: skip
    stats = {**aux.stats, "capacity": aux.capacity}
    y_td = y.reshape(-1, y.shape[-1])  # [T, d]
    return y_td, MoeAux(aux_loss=aux.aux_loss, z_loss=aux.z_loss, stats=stats)
