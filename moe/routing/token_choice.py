"""Top-k token-choice routing with expert capacity: GShard top-2, Switch top-1, and the
DeepSeek family (sigmoid gates, a selection bias, device-limited routing).

Each token picks its ``k`` best experts by a selection score; each expert has ``C`` slots, filled
with all first choices in token order, then all second choices, and so on (GShard, Lepikhin et
al. 2020, Algorithm 1); a choice that finds its expert full is dropped and the token keeps only
its residual for that choice. Everything runs in float32 whatever the logits dtype (Switch §2.4,
"selective precision").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe.routing import losses, stats
from moe.routing.result import Routing
from moe.routing.slots import fill_slots

SECOND_EXPERT_POLICIES = ("all", "random")
SCORES = ("softmax", "sigmoid")


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * k * T / E)``, clamped to ``[1, T]``.

    The rule (papers §11.2 lists the disagreeing sources): Switch's ``T / E * CF`` times ``k``
    as in GShard's ``2S/E`` for top-2, so ``capacity_factor = 1`` leaves exactly enough slots for
    all ``k * T`` choices under perfect balance. Rounded *up* (no minimum of 4 and no rounding to
    a multiple of 4 as in lingvo; a caller that wants those applies them). The product is rounded
    to 9 decimals before the ceiling, so float error (1.1 * 2 * 10 / 2 = 11.000000000000002)
    does not add a slot. ``capacity_factor <= 0`` means dropless: ``T`` slots, since an expert
    receives each token at most once. The upper clamp to ``T`` holds for the same reason.

    Args:
      num_tokens: T, tokens routed together (one group).
      num_experts: E.
      k: experts per token.
      capacity_factor: CF; <= 0 for no dropping.

    Returns:
      C, a Python int in ``[1, T]``.
    """
    if num_tokens < 1 or num_experts < 1 or k < 1:
        raise ValueError(
            f"capacity needs num_tokens, num_experts, k >= 1; got {num_tokens}, {num_experts}, {k}"
        )
    if capacity_factor <= 0:
        return num_tokens
    slots = math.ceil(round(capacity_factor * k * num_tokens / num_experts, 9))
    return min(max(slots, 1), num_tokens)


def _check_args(shape, k, capacity, policy, threshold, key) -> None:
    if len(shape) != 2:
        raise ValueError(f"logits must be [T, E]; got shape {shape}")
    if not 1 <= k <= shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of experts ({shape[1]})")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    if policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"second_expert_policy={policy!r}; expected one of {SECOND_EXPERT_POLICIES}"
        )
    if policy == "random" and (key is None or threshold <= 0):
        raise ValueError(
            "second_expert_policy='random' needs a jax.random key and second_expert_threshold > 0"
        )


def _check_deepseek_args(shape, k, score, bias, device_limit, num_devices) -> None:
    num_tokens, num_experts = shape
    if score not in SCORES:
        raise ValueError(f"score={score!r}; expected one of {SCORES}")
    if bias is not None and bias.shape not in ((num_experts,), (num_tokens, num_experts)):
        raise ValueError(f"bias has shape {bias.shape}; expected ({num_experts},) or {shape}")
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(
            f"num_devices={num_devices} must be >= 1 and divide the {num_experts} experts"
        )
    if device_limit < 0:
        raise ValueError(f"device_limit={device_limit} must be >= 0 (0: no limit)")
    if 0 < device_limit < num_devices and device_limit * (num_experts // num_devices) < k:
        raise ValueError(
            f"device_limit={device_limit} devices hold {device_limit * num_experts // num_devices}"
            f" experts, fewer than k={k}"
        )


def softmax(logits: jax.Array, blocks: tuple[int, ...] = ()) -> jax.Array:
    """``softmax(logits)`` over the last axis, its normaliser summed block by block.

    ``blocks``: sizes of consecutive expert blocks (summing to ``E``); ``()`` or one block is
    ``jax.nn.softmax``. With blocks, ``sum_j exp(x_j - max)`` is the sum of each block's own
    sum, added left to right. A grown model's blocks are the parent's experts followed by each
    growth's new ones (``moe.grown_experts``): for a task whose new experts are masked (their
    exponentials are exact zeros) the normaliser is then the parent's number plus exact zeros,
    bit for bit, whatever order the backend sums a longer row in (XLA:CPU sums 72 or 80 in
    another order than 64: last-bit differences in the gates).
    """
    if len(blocks) <= 1:
        return jax.nn.softmax(logits, axis=-1)
    if sum(blocks) != logits.shape[-1] or min(blocks) < 1:
        raise ValueError(f"blocks={blocks} must be >= 1 and sum to {logits.shape[-1]} experts")
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(shifted)
    total, start = None, 0
    for size in blocks:
        part = jnp.sum(unnormalised[..., start : start + size], axis=-1, keepdims=True)
        total = part if total is None else total + part
        start += size
    return unnormalised / total


def scores(
    logits: jax.Array, score: str, blocks: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """Router scores ``s [T, E]`` and their normalised form ``s / sum_j s_j`` (rows sum to 1).

    ``softmax``: ``s = softmax(logits)`` (Switch eq. 1; normaliser summed by ``blocks``, see
    ``softmax``), already normalised. ``sigmoid``: ``s = sigmoid(logits)`` (DeepSeek-V3
    §2.1.2, eq. 15), normalised as in the complementary sequence-wise balance loss
    (DeepSeek-V3 eq. 19, ``s'_i = s_i / sum_j s_j``); the gates use ``s`` alone.
    """
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        probs = softmax(logits, blocks)
        return probs, probs
    s = jax.nn.sigmoid(logits)
    return s, s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)


def device_mask(selection: jax.Array, device_limit: int, num_devices: int) -> jax.Array:
    """bool[T, E]: the experts on each token's ``device_limit`` best devices.

    Device-limited routing (DeepSeek-V2 §2.1.3): the ``E`` experts are split into ``D =
    num_devices`` contiguous blocks (device ``j`` holds experts ``j*E/D ... (j+1)*E/D - 1``); a
    device's score is the best selection score of its experts; the ``M = device_limit`` best
    devices are kept (ties towards the lower device index). ``M = 0`` or ``M >= D``: all True.
    """
    num_tokens, num_experts = selection.shape
    if device_limit == 0 or device_limit >= num_devices:
        return jnp.ones(selection.shape, bool)
    per_device = selection.reshape(num_tokens, num_devices, num_experts // num_devices)
    _, kept = jax.lax.top_k(jnp.max(per_device, axis=-1), device_limit)  # [T, M]
    on_kept = jnp.any(jax.nn.one_hot(kept, num_devices, dtype=bool), axis=1)  # [T, D]
    return jnp.repeat(on_kept, num_experts // num_devices, axis=1)  # [T, E]


def top_k(
    logits: jax.Array,
    *,
    k: int,
    capacity: int,
    score: str = "softmax",
    bias: jax.Array | None = None,
    device_limit: int = 0,
    num_devices: int = 1,
    routed_scaling: float = 1.0,
    renormalize: bool = True,
    second_expert_policy: str = "all",
    second_expert_threshold: float = 0.2,
    batch_priority: bool = False,
    key: jax.Array | None = None,
    token_mask: jax.Array | None = None,
    capacity_limit: jax.Array | None = None,
    blocks: tuple[int, ...] = (),
) -> Routing:
    """Route each token to its top-``k`` experts under a per-expert capacity.

    Rules:
      - Scores ``s``: ``score="softmax"``, ``s = softmax(logits)`` over experts in float32
        (Switch eq. 1); ``score="sigmoid"``, ``s = sigmoid(logits)`` (DeepSeek-V3 eq. 15).
      - Selection: the ``k`` largest ``s + b`` (``b = bias``, zero when None; DeepSeek-V3 eq. 16,
        the auxiliary-loss-free bias of Wang et al. 2024), ties broken towards the lower expert
        index. The bias only selects: it is in no gate and no gradient flows into it.
      - Device limit (DeepSeek-V2 §2.1.3): with ``0 < device_limit < num_devices``, only the
        experts on each token's ``device_limit`` devices with the highest best ``s + b`` compete
        (``device_mask``; expert ``e`` is on device ``e // (E / num_devices)``).
      - Gates: ``renormalize=True``, ``g_j = s_j / sum_{j<k} s_j`` (GShard Algorithm 1,
        ``g1 <- g1/(g1+g2)``; DeepSeek-V3 eq. 13 for sigmoid); ``False``, raw ``s_j`` (Switch
        eq. 2, k=1). Then times ``routed_scaling`` (DeepSeek-V3's routed scaling factor).
        Note: sigmoid with ``k=1`` and renormalisation gives every gate 1, so the router then
        learns from the balance loss alone.
      - ``second_expert_policy="random"``: draws ``U = jax.random.uniform(key, [T, k])`` and keeps
        choice ``j >= 1`` iff ``U[t, j] < g_j / second_expert_threshold`` (probability
        ``min(1, g/threshold)``, Mesh-TF ``moe.py:1446-1466``; GShard §2.2 is threshold 0.5), where
        ``g_j`` is the renormalised, unscaled gate whatever ``renormalize`` says. A skipped choice
        takes no slot (as in the lingvo / Mesh-TF code, unlike Algorithm 1's counter).
      - Slots: all first choices, then all second choices, ...; within a rank in token order, or
        with ``batch_priority=True`` in order of descending top-1 score (Riquelme et al.
        2021, V-MoE BPR; it looks at the whole group, so encoder-only, ST-MoE §5). A choice whose
        expert already holds ``capacity`` tokens is dropped.
      - ``aux_loss = E * sum_i f_i * P_i`` (Switch eq. 4; code form of papers §11.1) where
        ``f_i`` counts every one of the ``k`` selected experts before capacity and before the
        random policy, normalised to sum to 1, and ``P_i`` is the mean of the normalised score
        ``s_i / sum_j s_j`` (``p_i`` itself for softmax); it is exactly 1.0 under perfectly
        uniform routing. For sigmoid this is DeepSeek-V3's complementary sequence-wise balance
        loss (eqs. 17-20, ``N_r / (K_r T) sum_t 1(...) = E f_i``) over the routing group instead
        of one sequence. ``z_loss = mean(logsumexp(logits)^2)`` (ST-MoE eq. 5) for both scores.

    Args:
      logits: float[T, E] router logits (any float dtype).
      k: experts per token (static).
      capacity: slots per expert C (static), e.g. from ``capacity(...)``.
      score: ``"softmax"`` or ``"sigmoid"`` (static).
      bias: optional float32[E] selection bias (or [T, E], per token: the router keeps masked
        experts out with a very negative entry).
      device_limit: M, devices a token's experts may lie on (static); 0 = no limit.
      num_devices: D, devices the experts are split over (static; divides E).
      routed_scaling: factor on every gate (static).
      renormalize: divide the k gates by their sum.
      second_expert_policy: ``"all"`` or ``"random"`` (static).
      second_expert_threshold: threshold of the random policy (static: it is validated).
      batch_priority: fill slots by descending top-1 score (static).
      key: ``jax.random`` key, needed by the random policy.
      token_mask: optional bool[T]; False tokens (padding) are never routed and count in no loss
        or statistic.
      capacity_limit: optional traced int, the slots per expert actually usable (``<=
        capacity``), e.g. counted from the real tokens of the group (``moe.layers.moe``); slots
        past it stay empty and the choices that would fill them are dropped. None: capacity.
      blocks: expert blocks of the softmax's normaliser (static; ``softmax``): a grown model's
        parent experts and each growth's new ones; ``()``: one block.

    Returns:
      ``Routing`` with slot_token int32[E, C], slot_weight float32[E, C] (differentiable), the
      unweighted losses and stats (see ``moe.routing.stats``; the probability stats are of the
      normalised scores) plus ``second_expert_skipped_fraction``, the fraction of real tokens'
      choices 2..k skipped by the random policy (0 for ``"all"``).
    """
    _check_args(logits.shape, k, capacity, second_expert_policy, second_expert_threshold, key)
    _check_deepseek_args(logits.shape, k, score, bias, device_limit, num_devices)
    logits = logits.astype(jnp.float32)
    num_tokens, num_experts = logits.shape
    valid = stats.valid_mask(num_tokens, token_mask)
    s, normalised = scores(logits, score, blocks)  # [T, E] each
    selection = jax.lax.stop_gradient(s)
    if bias is not None:
        selection = selection + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if 0 < device_limit < num_devices:
        allowed = device_mask(selection, device_limit, num_devices)
        selection = jnp.where(allowed, selection, -jnp.inf)
    _, experts = jax.lax.top_k(selection, k)  # [T, k]
    top_scores = jnp.take_along_axis(s, experts, axis=-1)  # [T, k], differentiable
    renormed = top_scores / jnp.sum(top_scores, axis=-1, keepdims=True)
    gates = (renormed if renormalize else top_scores) * routed_scaling
    active = jnp.broadcast_to(valid[:, None], (num_tokens, k))  # [T, k]
    if second_expert_policy == "random":
        uniform = jax.random.uniform(key, (num_tokens, k))
        keep = uniform < renormed / second_expert_threshold
        active = active & keep.at[:, 0].set(True)
    order = None
    if batch_priority:
        priority = jnp.where(valid, top_scores[:, 0], -jnp.inf)
        order = jnp.argsort(-priority, stable=True)  # padding last; ties in token order
    slots = fill_slots(
        experts,
        gates,
        active,
        num_experts=num_experts,
        capacity=capacity,
        order=order,
        limit=capacity_limit,
    )
    fraction = stats.expert_fraction(experts, valid, num_experts)
    later_valid = jnp.sum(valid) * (k - 1)
    skipped = later_valid - jnp.sum(active[:, 1:])
    return Routing(
        slot_token=slots.slot_token,
        slot_weight=slots.slot_weight,
        aux_loss=losses.switch_balance_loss(normalised, fraction, valid),
        z_loss=losses.router_z_loss(logits, valid),
        stats={
            **stats.slot_stats(slots.slot_token, slots.kept, active, valid),
            **stats.probability_stats(normalised, valid),
            **stats.selection_stats(experts, valid, num_experts, num_devices),
            "expert_fraction": fraction,
            "second_expert_skipped_fraction": (skipped / jnp.maximum(later_valid, 1)).astype(
                jnp.float32
            ),
        },
    )
