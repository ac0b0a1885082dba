"""Noisy top-k gating with the smooth load estimator (Shazeer et al. 2017, §2.1 and Appendix A).

    H(x)_i = (x W_g)_i + StandardNormal() * noise_std_i                    (eq. 4)
    G(x)   = Softmax(KeepTopK(H(x), k))                                     (eqs. 3, 5)
    P(x,i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / noise_std_i)    (eqs. 8-9)
    aux    = CV(Importance)^2 + CV(Load)^2,  Load_i = sum_x P(x, i)        (eqs. 6-7, 10-11)

The layer computes ``noise_std = softplus(x W_noise) + 1e-2`` (tensor2tensor
``noisy_top_k_gating``); this module is pure. The paper has no capacity; here the slots are
filled as for every token-choice router (``moe.routing.slots``), so ``capacity = T`` reproduces
the paper exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe.routing import losses, stats
from moe.routing.result import Routing
from moe.routing.slots import fill_slots


def _normal_cdf(x: jax.Array, stddev: jax.Array) -> jax.Array:
    """Phi(x / stddev), tensor2tensor ``_normal_distribution_cdf`` (1e-20 guards stddev = 0)."""
    return 0.5 * (1.0 + jax.lax.erf(x / (math.sqrt(2.0) * stddev + 1e-20)))


def prob_in_top_k(
    clean_logits: jax.Array,
    noisy_logits: jax.Array,
    noise_std: jax.Array,
    top_noisy_values: jax.Array,
    k: int,
) -> jax.Array:
    """P(x, i): probability that expert i stays in the top k under fresh noise on i alone.

    Shazeer et al. 2017, Appendix A, eq. 9, as tensor2tensor ``_prob_in_top_k``: if expert i is
    in the top k, ``kth_excluding(H, k, i)`` is the (k+1)-th largest noisy value, otherwise the
    k-th; ``P = Phi((clean_i - threshold) / noise_std_i)``. Differentiable in the clean logits,
    the noise std and (through the thresholds) the noisy values.

    Args:
      clean_logits: float32[T, E] ``x W_g``.
      noisy_logits: float32[T, E] ``H(x)``.
      noise_std: float32[T, E] > 0.
      top_noisy_values: float32[T, >= k+1] the largest noisy values, sorted descending.
      k: experts per token, ``k < E``.

    Returns:
      float32[T, E] in [0, 1].
    """
    threshold_if_in = top_noisy_values[:, k : k + 1]  # [T, 1], (k+1)-th largest
    threshold_if_out = top_noisy_values[:, k - 1 : k]  # [T, 1], k-th largest
    is_in = noisy_logits > threshold_if_in
    prob_if_in = _normal_cdf(clean_logits - threshold_if_in, noise_std)
    prob_if_out = _normal_cdf(clean_logits - threshold_if_out, noise_std)
    return jnp.where(is_in, prob_if_in, prob_if_out)


def top_k(
    clean_logits: jax.Array,
    noise_std: jax.Array,
    *,
    k: int,
    capacity: int,
    key: jax.Array | None,
    train: bool,
    token_mask: jax.Array | None = None,
    capacity_limit: jax.Array | None = None,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5) with the CV^2 losses (eqs. 6-11).

    Rules:
      - ``train=True``: ``H = clean + jax.random.normal(key, [T, E]) * noise_std`` (eq. 4);
        ``train=False``: ``H = clean`` (noise at training time only, as the t2t code does).
      - The k largest ``H`` are kept (ties towards the lower index); gates are the softmax over
        those k values only (eq. 3, t2t). Slots: all first choices in token order, then all
        second choices, ...; a choice whose expert is full is dropped.
      - ``aux_loss = cv2(Importance) + cv2(Load)`` with ``Importance_i = sum_x G(x)_i`` (eq. 6)
        and ``Load_i = sum_x P(x, i)`` from ``prob_in_top_k`` (eq. 10). Without noise, or with
        ``k = E``, Load is the true number of tokens per expert (no gradient), as in t2t. Both
        terms are over the real tokens and before capacity; unweighted (t2t sums them and
        multiplies by ``loss_coef = 1e-2``).
      - ``z_loss`` on the clean logits (ST-MoE eq. 5), for monitoring or use.

    Args:
      clean_logits: float[T, E] ``x W_g`` (computed in float32 here).
      noise_std: float[T, E] ``softplus(x W_noise) + 1e-2`` from the layer.
      k: experts per token (static).
      capacity: slots per expert C (static); ``T`` for no dropping, as in the paper.
      key: ``jax.random`` key for the noise; may be None when ``train=False``.
      train: add noise (static Python bool).
      token_mask: optional bool[T]; False tokens are never routed and count in no loss or stat.
      capacity_limit: optional traced int ``<= capacity``: usable slots per expert (as in
        ``token_choice.top_k``). None: capacity.

    Returns:
      ``Routing``; stats as in ``moe.routing.stats`` (confidence and entropy of the clean
      softmax) plus ``importance_cv2`` and ``load_cv2``.
    """
    clean = clean_logits.astype(jnp.float32)
    num_tokens, num_experts = clean.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be between 1 and the number of experts ({num_experts})")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    if train and key is None:
        raise ValueError("noisy.top_k(train=True) needs a jax.random key for the noise")
    std = noise_std.astype(jnp.float32)
    valid = stats.valid_mask(num_tokens, token_mask)
    weight = valid.astype(jnp.float32)[:, None]  # [T, 1]
    noisy = clean + jax.random.normal(key, clean.shape) * std if train else clean
    top_values, top_experts = jax.lax.top_k(noisy, min(k + 1, num_experts))  # [T, k+1]
    experts = top_experts[:, :k]  # [T, k]
    gates = jax.nn.softmax(top_values[:, :k], axis=-1)  # [T, k]
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, k, E]
    dense_gates = jnp.einsum("tk,tke->te", gates, onehot) * weight  # [T, E]
    if train and k < num_experts:
        load = jnp.sum(prob_in_top_k(clean, noisy, std, top_values, k) * weight, axis=0)  # [E]
    else:
        load = jnp.sum(onehot * weight[:, :, None], axis=(0, 1))  # [E], true counts
    importance_cv2 = losses.importance_loss(dense_gates)
    load_cv2 = losses.load_loss(load)
    active = jnp.broadcast_to(valid[:, None], (num_tokens, k))
    slots = fill_slots(
        experts, gates, active, num_experts=num_experts, capacity=capacity, limit=capacity_limit
    )
    return Routing(
        slot_token=slots.slot_token,
        slot_weight=slots.slot_weight,
        aux_loss=importance_cv2 + load_cv2,
        z_loss=losses.router_z_loss(clean, valid),
        stats={
            **stats.slot_stats(slots.slot_token, slots.kept, active, valid),
            **stats.probability_stats(jax.nn.softmax(clean, axis=-1), valid),
            "expert_fraction": stats.expert_fraction(experts, valid, num_experts),
            "importance_cv2": jax.lax.stop_gradient(importance_cv2),
            "load_cv2": jax.lax.stop_gradient(load_cv2),
        },
    )
