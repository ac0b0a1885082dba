"""Moving tokens into expert buffers and back, by a ``Routing``'s slot indices.

Pure functions of the routing contract (``moe.routing.result``), shared by the single-device
MoE block and the expert-parallel exchange (``moe.parallel.expert_parallel``). Nothing here
builds a ``[T, E, C]`` one-hot tensor (GShard Algorithm 2's dispatch/combine einsums cost
``O(T * E * C * d)``, see ``scripts/bench_moe.py``): dispatch is a gather whose backward is a
scatter-add of ``E * C`` rows, combine a scatter-add whose backward is a gather.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.routing.result import Routing


def dispatch(x_td: jax.Array, slot_token: jax.Array) -> jax.Array:
    """Gather each slot's token: ``x_td [T, d], slot_token int[E, C] -> [E, C, d]``.

    Empty slots (-1) get zeros. The backward pass is a scatter-add of the ``E * C`` rows.
    """
    num_tokens = x_td.shape[0]
    index = jnp.where(slot_token < 0, num_tokens, slot_token)  # -1 -> out of bounds -> 0
    return jnp.take(x_td, index, axis=0, mode="fill", fill_value=0)  # [E, C, d]


def combine(
    y_ecd: jax.Array, slot_token: jax.Array, slot_weight: jax.Array, num_tokens: int
) -> jax.Array:
    """Weighted scatter-add of expert outputs back onto tokens, in float32.

    ``y_t = sum_{(e, c): slot_token[e, c] = t} slot_weight[e, c] * y_ecd[e, c]``; tokens in no
    slot get 0. ``y_ecd [E, C, d]``, ``slot_token int[E, C]``, ``slot_weight [E, C]`` ->
    ``float32[T, d]``. Gradients reach ``slot_weight`` (so the router) and ``y_ecd``; the
    backward pass is two gathers of ``g[slot_token]``.
    """
    d = y_ecd.shape[-1]
    index = jnp.where(slot_token < 0, num_tokens, slot_token).reshape(-1)  # [E*C]
    rows = y_ecd.astype(jnp.float32) * slot_weight.astype(jnp.float32)[..., None]  # [E, C, d]
    out = jnp.zeros((num_tokens, d), jnp.float32)
    return out.at[index].add(rows.reshape(-1, d), mode="drop")  # [T, d]


def restrict_to_allowed(routing: Routing, allowed_te: jax.Array) -> Routing:
    """Empty every slot whose token may not use its expert (``allowed_te bool[T, E]``).

    The router already sees masked logits, but a token with fewer than ``k`` allowed experts, or
    an expert choosing among too few allowed tokens, would still fill a slot at gate 0; this
    makes "no masked expert receives a token" hold exactly.
    """
    slot_token = routing.slot_token
    num_experts = slot_token.shape[0]
    experts = jnp.arange(num_experts)[:, None]  # [E, 1]
    ok = (slot_token >= 0) & allowed_te[jnp.maximum(slot_token, 0), experts]  # [E, C]
    return dataclasses.replace(
        routing,
        slot_token=jnp.where(ok, slot_token, -1),
        slot_weight=jnp.where(ok, routing.slot_weight, 0.0),
    )
