"""Assign token choices to expert capacity slots (GShard Algorithm 1, in linear-algebra form).

Shared by every token-choice router (softmax top-k, noisy top-k, hierarchical): given each
token's ``k`` chosen experts, in order of preference, fill each expert's ``C`` slots with all
first choices in processing order, then all second choices, and so on; a choice that finds its
expert full is dropped. Positions come from an exclusive cumulative sum over a one-hot mask
(lingvo ``Top2GatingOnLogits``), so there is no Python loop over tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """Slot assignment for ``T`` tokens with ``k`` choices each.

    Attributes:
      slot_token: int32[E, C]; token in slot ``c`` of expert ``e``, -1 if empty.
      slot_weight: float32[E, C]; gate of that token for that expert, 0 if empty.
      kept: bool[T, k]; choice ``j`` of token ``t`` got a slot.
      position: int32[T, k]; its position in the expert's queue (``>= C`` when it was dropped,
        meaningless where the choice was not active).
    """

    slot_token: jax.Array
    slot_weight: jax.Array
    kept: jax.Array
    position: jax.Array


def fill_slots(
    experts: jax.Array,
    gates: jax.Array,
    active: jax.Array,
    *,
    num_experts: int,
    capacity: int,
    order: jax.Array | None = None,
    limit: jax.Array | None = None,
) -> Slots:
    """Fill expert slots choice-major: every token's 1st choice, then every 2nd choice, ...

    Args:
      experts: int[T, k] chosen experts, best first; the ``k`` experts of a token are distinct.
      gates: float[T, k] combine weights of those choices.
      active: bool[T, k]; False choices (padding tokens, skipped second experts) take no slot
        and do not advance any expert's counter.
      num_experts: E.
      capacity: C, slots per expert (static).
      order: optional int[T] permutation; tokens are processed in the order
        ``order[0], order[1], ...`` within each choice rank (batch prioritized routing).
        Default: token order.
      limit: optional traced int ``<= capacity``: slots usable per expert (the buffer keeps
        ``capacity`` columns; columns from ``limit`` on stay empty). None: ``capacity``.

    Returns:
      ``Slots``; ``slot_weight`` is differentiable with respect to ``gates``.
    """
    num_tokens, k = experts.shape
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    if order is not None:
        experts, gates, active, tokens = experts[order], gates[order], active[order], order
    experts_kt = experts.T.astype(jnp.int32)  # [k, T], choice-major queue
    active_kt = active.T
    onehot = jax.nn.one_hot(experts_kt, num_experts, dtype=jnp.int32)  # [k, T, E]
    onehot = onehot * active_kt[..., None].astype(jnp.int32)
    flat = onehot.reshape(k * num_tokens, num_experts)  # [k*T, E]
    before = jnp.cumsum(flat, axis=0) - flat  # exclusive cumsum: choices queued earlier
    position_kt = jnp.sum(before * flat, axis=-1).reshape(k, num_tokens)  # [k, T]
    usable = capacity if limit is None else jnp.minimum(limit, capacity)
    kept_kt = active_kt & (position_kt < usable)
    # Dropped or inactive choices get an out-of-range slot index and vanish in the scatter.
    slot_kt = jnp.where(kept_kt, position_kt, capacity)
    tokens_kt = jnp.broadcast_to(tokens[None, :], (k, num_tokens)).astype(jnp.int32)
    slot_token = jnp.full((num_experts, capacity), -1, jnp.int32)
    slot_token = slot_token.at[experts_kt, slot_kt].set(tokens_kt, mode="drop")
    slot_weight = jnp.zeros((num_experts, capacity), jnp.float32)
    slot_weight = slot_weight.at[experts_kt, slot_kt].set(gates.T.astype(jnp.float32), mode="drop")
    kept, position = kept_kt.T, position_kt.T  # [T, k] in processing order
    if order is not None:
        kept = jnp.zeros_like(kept).at[order].set(kept)
        position = jnp.zeros_like(position).at[order].set(position)
    return Slots(slot_token, slot_weight, kept, position)
