"""Two-level (hierarchical) top-k gating over ``A`` groups of ``B`` experts (Shazeer et al.
2017, Appendix B).

    y_H = sum_a sum_b G_primary(x)_a * G_a(x)_b * E_{a,b}(x),   expert index = a * B + b

Each level is the top-k softmax gate of eq. 3 without noise: softmax over the kept logits only.
A token therefore uses ``k_primary * k_secondary`` experts. Its choices are ranked by combined
gate (best first, ties in (primary rank, secondary rank) order) and fill the slots like every
token-choice router: all first choices in token order, then all second choices, ...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.routing import losses, stats
from moe.routing.result import Routing
from moe.routing.slots import fill_slots


def _check(primary_shape, secondary_shape, k_primary, k_secondary, capacity) -> None:
    if len(primary_shape) != 2 or len(secondary_shape) != 3:
        raise ValueError(
            f"expected primary_logits [T, A] and secondary_logits [T, A, B]; got "
            f"{primary_shape} and {secondary_shape}"
        )
    if secondary_shape[:2] != primary_shape:
        raise ValueError(
            f"secondary_logits {secondary_shape} must start with primary_logits' {primary_shape}"
        )
    if not 1 <= k_primary <= primary_shape[1]:
        raise ValueError(f"k_primary={k_primary} must be between 1 and A={primary_shape[1]}")
    if not 1 <= k_secondary <= secondary_shape[2]:
        raise ValueError(f"k_secondary={k_secondary} must be between 1 and B={secondary_shape[2]}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")


def top_k(
    primary_logits: jax.Array,
    secondary_logits: jax.Array,
    *,
    k_primary: int,
    k_secondary: int,
    capacity: int,
    token_mask: jax.Array | None = None,
    capacity_limit: jax.Array | None = None,
) -> Routing:
    """Hierarchical top-k routing to ``A * B`` experts.

    Rules:
      - ``G_primary = softmax(KeepTopK(primary_logits, k_primary))`` and, for every group a,
        ``G_a = softmax(KeepTopK(secondary_logits[:, a], k_secondary))`` (eq. 3, no noise);
        gate of expert ``(a, b)`` is ``G_primary(x)_a * G_a(x)_b`` (App. B), so a token's gates
        sum to 1.
      - ``aux_loss = cv2(Importance_H) + cv2(Load_H)``. ``Importance_H(X)_{a,b} = sum_x
        G_primary(x)_a G_a(x)_b`` (App. B) carries the gradient. ``Load_H(X)_{a,b} =
        Load_primary(X)_a Load_a(X^(a))_b / |X^(a)|``; without noise each Load is a true count
        (t2t's no-noise branch), and the product reduces to the number of tokens assigned to
        (a, b) before capacity: no gradient, but it adds the real, discrete imbalance to the
        value, as the flat noisy router does in evaluation.
      - ``z_loss`` = ST-MoE eq. 5 on the primary logits + eq. 5 on the secondary logits averaged
        over tokens and groups.

    Args:
      primary_logits: float[T, A].
      secondary_logits: float[T, A, B]; row ``[t, a]`` is the logits of group a's gate.
      k_primary, k_secondary: experts kept at each level (static).
      capacity: slots per expert C (static), e.g. ``capacity(T, A*B, k_primary*k_secondary, cf)``.
      token_mask: optional bool[T]; False tokens are never routed and count in no loss or stat.
      capacity_limit: optional traced int ``<= capacity``: usable slots per expert (as in
        ``token_choice.top_k``). None: capacity.

    Returns:
      ``Routing`` over ``E = A * B`` experts; stats as in ``moe.routing.stats`` (confidence and
      entropy of the dense distribution ``softmax(primary)_a * softmax(secondary_a)_b``) plus
      ``importance_cv2`` and ``load_cv2``.
    """
    _check(primary_logits.shape, secondary_logits.shape, k_primary, k_secondary, capacity)
    primary = primary_logits.astype(jnp.float32)
    secondary = secondary_logits.astype(jnp.float32)
    num_tokens, num_groups, group_size = secondary.shape
    num_experts, k = num_groups * group_size, k_primary * k_secondary
    valid = stats.valid_mask(num_tokens, token_mask)
    weight = valid.astype(jnp.float32)

    top_primary, groups = jax.lax.top_k(primary, k_primary)  # [T, kp]
    gate_primary = jax.nn.softmax(top_primary, axis=-1)  # [T, kp]
    top_secondary, members = jax.lax.top_k(secondary, k_secondary)  # [T, A, ks]
    gate_secondary = jax.nn.softmax(top_secondary, axis=-1)  # [T, A, ks]
    chosen_gate = jnp.take_along_axis(gate_secondary, groups[:, :, None], axis=1)  # [T, kp, ks]
    chosen_member = jnp.take_along_axis(members, groups[:, :, None], axis=1)  # [T, kp, ks]
    combined = (gate_primary[:, :, None] * chosen_gate).reshape(num_tokens, k)  # [T, K]
    experts = (groups[:, :, None] * group_size + chosen_member).reshape(num_tokens, k)  # [T, K]
    rank = jnp.argsort(-jax.lax.stop_gradient(combined), axis=-1, stable=True)  # best first
    gates = jnp.take_along_axis(combined, rank, axis=-1)  # [T, K]
    experts = jnp.take_along_axis(experts, rank, axis=-1)  # [T, K]

    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, K, E]
    dense_gates = jnp.einsum("tk,tke,t->te", gates, onehot, weight)  # [T, E]
    load = jnp.einsum("tke,t->e", onehot, weight)  # [E], true counts
    importance_cv2 = losses.importance_loss(dense_gates)
    load_cv2 = losses.load_loss(load)
    z_loss = losses.router_z_loss(primary, valid) + losses.router_z_loss(
        secondary.reshape(num_tokens * num_groups, group_size),  # [T*A, B]
        jnp.repeat(valid, num_groups),
    )

    active = jnp.broadcast_to(valid[:, None], (num_tokens, k))
    slots = fill_slots(
        experts, gates, active, num_experts=num_experts, capacity=capacity, limit=capacity_limit
    )
    dense = jax.nn.softmax(primary, axis=-1)[:, :, None] * jax.nn.softmax(secondary, axis=-1)
    return Routing(
        slot_token=slots.slot_token,
        slot_weight=slots.slot_weight,
        aux_loss=importance_cv2 + load_cv2,
        z_loss=z_loss,
        stats={
            **stats.slot_stats(slots.slot_token, slots.kept, active, valid),
            **stats.probability_stats(dense.reshape(num_tokens, num_experts), valid),
            "expert_fraction": stats.expert_fraction(experts, valid, num_experts),
            "importance_cv2": jax.lax.stop_gradient(importance_cv2),
            "load_cv2": jax.lax.stop_gradient(load_cv2),
        },
    )
