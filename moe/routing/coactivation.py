"""Which experts the same token uses together: counts for placing experts on devices.

Computed from a ``Routing`` (kept slots only, so dropped choices and padding tokens do not
count), for one routing group, in evaluation (``MoeSpec.routing_stats``; the train step does
not pay for them). ``moe.placement`` turns them into per-device loads and exchange traffic.

    A     [T, E]  1 where token t holds a slot of expert e (its kept choices)
    first [T, E]  one-hot of the token's *first* kept expert: the largest combine weight
                  (all zeros for a token that kept none)

    coactivation        A^T A       [E, E]  tokens with kept choices at both e and f;
                                            the diagonal: tokens kept at e (the load)
    first_coactivation  first^T A   [E, E]  tokens whose first kept expert is e and that
                                            also use f; the diagonal: tokens first at e
    transition          first'^T A  [E', E] tokens whose first kept expert in the previous
                                            MoE layer of the stack was e and that use f here
    routed_tokens       scalar              real tokens with at least one kept choice

Counts are float32 (exact integers below 2^24 tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.routing.result import Routing

FIRST_EXPERT = "token_first_expert"  # the per-token stat handed to the next MoE layer


def assignment(routing: Routing, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """``(A, weight)``: float32[T, E] kept-slot indicator and combine weight per token/expert."""
    slot_token, num_experts = routing.slot_token, routing.num_experts
    index = jnp.where(slot_token < 0, num_tokens, slot_token)  # empty slot -> dropped row
    experts = jnp.broadcast_to(jnp.arange(num_experts)[:, None], slot_token.shape)  # [E, C]
    kept = jnp.zeros((num_tokens, num_experts), jnp.float32)
    kept = kept.at[index, experts].set(1.0, mode="drop")  # [T, E]
    weight = jnp.zeros((num_tokens, num_experts), jnp.float32)
    weight = weight.at[index, experts].set(routing.slot_weight.astype(jnp.float32), mode="drop")
    return kept, weight


def first_expert(kept: jax.Array, weight: jax.Array) -> jax.Array:
    """float32[T, E]: one-hot of each token's kept expert with the largest combine weight
    (the lowest index on ties); zeros for a token with no kept choice."""
    score = jnp.where(kept > 0, weight, -jnp.inf)
    best = jax.nn.one_hot(jnp.argmax(score, axis=-1), kept.shape[-1], dtype=jnp.float32)
    return best * jnp.any(kept > 0, axis=-1, keepdims=True)


def coactivation_stats(
    routing: Routing, num_tokens: int, previous_first: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The module docstring's counts for one group of ``num_tokens`` tokens, plus
    ``FIRST_EXPERT`` ([T, E], for the next MoE layer). ``previous_first [T, E']`` is the
    previous MoE layer's ``FIRST_EXPERT`` for the same tokens (None: no ``transition``)."""
    kept, weight = assignment(routing, num_tokens)
    first = first_expert(kept, weight)
    dot = lambda a, b: jnp.einsum("te,tf->ef", a, b, precision=jax.lax.Precision.HIGHEST)
    out = {
        "coactivation": dot(kept, kept),
        "first_coactivation": dot(first, kept),
        "routed_tokens": jnp.sum(jnp.any(kept > 0, axis=-1)).astype(jnp.float32),
        FIRST_EXPERT: first,
    }
    if previous_first is not None:
        out["transition"] = dot(previous_first.astype(jnp.float32), kept)
    return jax.lax.stop_gradient(out)
