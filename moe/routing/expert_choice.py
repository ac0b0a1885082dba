"""Expert-choice routing: each expert picks its top-``C`` tokens (Zhou et al. 2022).

    S = softmax(logits) over experts;  G, I = TopK(S^T, C);  slot (e, c) <- token I[e, c], G[e, c]

Load is balanced by construction (every expert fills its C slots), so there is no balancing
loss; a token may be picked by 0..E experts. An expert ranks tokens across the whole group,
future positions included, so this router cannot be used in a causal decoder
(``check_allowed``; flaxformer ``ExpertsChooseMaskedRouter`` warns the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.routing import losses, stats, token_choice
from moe.routing.result import Routing


def check_allowed(causal: bool, where: str) -> None:
    """Raise ``ValueError`` when expert choice is asked for in a causal (autoregressive) block.

    Args:
      causal: whether the block that would use the router is causal.
      where: names the block or config key for the message, e.g. ``"decoder layer 3"``.
    """
    if causal:
        raise ValueError(
            "expert choice routing looks at future tokens; it cannot be used in a causal "
            f"decoder ({where})"
        )


def route(
    logits: jax.Array,
    *,
    capacity: int,
    token_mask: jax.Array | None = None,
    capacity_limit: jax.Array | None = None,
    blocks: tuple[int, ...] = (),
) -> Routing:
    """Each expert takes the ``capacity`` tokens with the highest router probability.

    Rules (Zhou et al. 2022, §3; flaxformer ``routing.py:647-717``):
      - ``S = softmax(logits)`` over experts in float32.
      - Expert e fills its slots with its top-``capacity`` tokens by ``S[:, e]``, best first, ties
        towards the lower token index; the combine weight is ``S[t, e]`` (differentiable).
      - Padding tokens (``token_mask`` False) are never picked; if fewer real tokens than
        ``capacity`` exist, the remaining slots are empty (-1, weight 0).
      - ``aux_loss = 0``; ``z_loss = mean(logsumexp(logits)^2)`` over real tokens (ST-MoE eq. 5).
      - The paper's ``k = n * c / e`` is ``token_choice.capacity(T, E, 1, c)`` with ``c`` the
        average number of experts per token (the paper's default is c = 2).

    Args:
      logits: float[T, E] router logits (any float dtype).
      capacity: slots per expert C, ``1 <= C <= T`` (static).
      token_mask: optional bool[T]; False tokens count in no loss or statistic.
      capacity_limit: optional traced int ``<= capacity``: each expert keeps only its best
        ``capacity_limit`` picks (e.g. counted from the real tokens). None: capacity.
      blocks: expert blocks of the softmax's normaliser (``token_choice.softmax``); ``()``:
        one block.

    Returns:
      ``Routing``; stats: ``unpicked_fraction`` (real tokens picked by no expert; these skip the
      layer, so it is also reported as ``dropped_fraction``), ``experts_per_token`` (mean over real
      tokens), ``expert_load``, ``tokens_per_expert``, ``router_confidence``, ``router_entropy``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [T, E]; got shape {logits.shape}")
    logits = logits.astype(jnp.float32)
    num_tokens, num_experts = logits.shape
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"capacity={capacity} must be between 1 and the number of tokens")
    valid = stats.valid_mask(num_tokens, token_mask)
    probs = token_choice.softmax(logits, blocks)  # [T, E]
    # Padding scores below every real probability (> 0), so it is picked only to fill up.
    scores = jnp.where(valid[:, None], probs, -1.0)
    _, picked = jax.lax.top_k(jax.lax.stop_gradient(scores).T, capacity)  # [E, C]
    picked_valid = valid[picked]  # [E, C]
    if capacity_limit is not None:
        picked_valid = picked_valid & (jnp.arange(capacity)[None, :] < capacity_limit)
    slot_token = jnp.where(picked_valid, picked, -1).astype(jnp.int32)
    gates = jnp.take_along_axis(probs.T, picked, axis=1)  # [E, C]
    slot_weight = jnp.where(picked_valid, gates, 0.0)

    weight = valid.astype(jnp.float32)
    num_valid = jnp.maximum(jnp.sum(weight), 1.0)
    flat = jnp.where(slot_token >= 0, slot_token, num_tokens).reshape(-1)  # [E*C], -1 -> OOB
    picks = jnp.zeros((num_tokens,), jnp.float32).at[flat].add(1.0, mode="drop")  # [T]
    unpicked = jnp.sum((picks == 0) * weight) / num_valid
    tokens_per_expert = jnp.sum(slot_token >= 0, axis=1).astype(jnp.float32)  # [E]
    return Routing(
        slot_token=slot_token,
        slot_weight=slot_weight,
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=losses.router_z_loss(logits, valid),
        stats={
            "unpicked_fraction": unpicked,
            "dropped_fraction": unpicked,
            "experts_per_token": jnp.sum(picks * weight) / num_valid,
            "expert_load": tokens_per_expert / jnp.maximum(jnp.sum(tokens_per_expert), 1.0),
            "tokens_per_expert": tokens_per_expert,
            **stats.probability_stats(probs, valid),
        },
    )
