"""Routing statistics for monitoring (never differentiated through).

The keys are shared by the routers so that metrics and reports can treat them alike:

- ``dropped_fraction``: scalar, fraction of the real tokens' active choices that found their
  expert full (capacity overflow);
- ``unrouted_fraction``: scalar, fraction of real tokens that got no expert at all (they pass
  through the residual only);
- ``expert_load``: [E], fraction of the kept assignments that went to each expert (sums to 1);
- ``tokens_per_expert``: [E], number of filled slots per expert;
- ``expert_fraction``: [E], fraction of all selected choices per expert *before* capacity
  (``f_i`` of the balance loss, sums to 1);
- ``choices_per_expert``: [E], number of the real tokens' selected choices per expert before
  capacity (the load ``c_i`` of the auxiliary-loss-free bias update, ``moe.routing.balance``);
- ``device_fanout``: scalar, mean number of distinct devices of the expert axis that a real
  token's selected experts lie on (1 on one device; at most ``min(k, D)``, or the device limit);
- ``router_confidence``: scalar, mean top-1 router probability over real tokens;
- ``router_entropy``: scalar, mean entropy (nats) of the router distribution over real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / jnp.maximum(den, 1.0)


def valid_mask(num_tokens: int, token_mask: jax.Array | None) -> jax.Array:
    """bool[T]: the real (non-padding) tokens; all True when ``token_mask`` is None."""
    if token_mask is None:
        return jnp.ones((num_tokens,), bool)
    if token_mask.shape != (num_tokens,):
        raise ValueError(f"token_mask has shape {token_mask.shape}; expected ({num_tokens},)")
    return token_mask.astype(bool)


def expert_fraction(experts: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """f_i: fraction of all selected choices per expert, before capacity (sums to 1).

    Args:
      experts: int[T, k] selected experts (every one of the k choices counts).
      valid: bool[T] real tokens.
      num_experts: E.

    Returns:
      float32[E]; all zeros when there is no real token.
    """
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, k, E]
    counts = jnp.sum(onehot * valid[:, None, None].astype(jnp.float32), axis=(0, 1))  # [E]
    return jax.lax.stop_gradient(_safe_div(counts, jnp.sum(counts)))


def selection_stats(
    experts: jax.Array, valid: jax.Array, num_experts: int, num_devices: int = 1
) -> dict[str, jax.Array]:
    """``choices_per_expert`` and ``device_fanout`` of the selected experts (before capacity).

    Args:
      experts: int[T, k] selected experts.
      valid: bool[T] real tokens.
      num_experts: E.
      num_devices: D; expert ``e`` lives on device ``e // (E / D)``.
    """
    weight = valid.astype(jnp.float32)
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, k, E]
    counts = jnp.sum(onehot * weight[:, None, None], axis=(0, 1))  # [E]
    device = experts // (num_experts // num_devices)  # [T, k]
    on = jnp.any(jax.nn.one_hot(device, num_devices, dtype=bool), axis=1)  # [T, D]
    fanout = jnp.sum(on, axis=-1).astype(jnp.float32)  # [T]
    return jax.lax.stop_gradient(
        {
            "choices_per_expert": counts,
            "device_fanout": _safe_div(jnp.sum(fanout * weight), jnp.sum(weight)),
        }
    )


def probability_stats(probs: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """``router_confidence`` and ``router_entropy`` of a router distribution.

    Args:
      probs: float[T, E] router probabilities (rows sum to 1).
      valid: bool[T] real tokens.
    """
    probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
    weight = valid.astype(jnp.float32)
    count = jnp.sum(weight)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)  # [T]
    return {
        "router_confidence": _safe_div(jnp.sum(jnp.max(probs, axis=-1) * weight), count),
        "router_entropy": _safe_div(jnp.sum(entropy * weight), count),
    }


def slot_stats(
    slot_token: jax.Array, kept: jax.Array, active: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
    """``dropped_fraction``, ``unrouted_fraction``, ``expert_load``, ``tokens_per_expert``.

    Args:
      slot_token: int32[E, C] filled slots (-1 empty).
      kept: bool[T, k] choices that got a slot.
      active: bool[T, k] choices that asked for a slot (already False for padding tokens).
      valid: bool[T] real tokens.
    """
    tokens_per_expert = jnp.sum(slot_token >= 0, axis=1).astype(jnp.float32)  # [E]
    num_active = jnp.sum(active).astype(jnp.float32)
    num_kept = jnp.sum(kept).astype(jnp.float32)
    routed = jnp.any(kept, axis=1) & valid  # [T]
    num_valid = jnp.sum(valid).astype(jnp.float32)
    return {
        "dropped_fraction": _safe_div(num_active - num_kept, num_active),
        "unrouted_fraction": _safe_div(num_valid - jnp.sum(routed), num_valid),
        "expert_load": _safe_div(tokens_per_expert, jnp.sum(tokens_per_expert)),
        "tokens_per_expert": tokens_per_expert,
    }
