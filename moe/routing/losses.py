"""Router auxiliary losses: importance, load, Switch balance, router z-loss.

Every function is pure, works in float32 whatever the input dtype, and returns an *unweighted*
scalar (the coefficient lives in the config). Padding tokens are excluded either by a
``token_mask`` argument or, for the sums over tokens, by passing rows of zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# tensor2tensor `cv_squared` (expert_utils.py:351-368) uses this epsilon in both denominators.
CV_EPS = 1e-10


def _valid_weights(num_tokens: int, token_mask: jax.Array | None) -> jax.Array:
    """float32[T]: 1 for a real token, 0 for padding."""
    if token_mask is None:
        return jnp.ones((num_tokens,), jnp.float32)
    return token_mask.astype(jnp.float32)


def cv_squared(x: jax.Array) -> jax.Array:
    """Squared coefficient of variation, Var(x) / Mean(x)^2 (Shazeer et al. 2017, §4, eq. 7).

    The tensor2tensor form: population variance, with ``eps = 1e-10`` added to the element count
    and to the squared mean so that an all-zero vector gives 0 rather than NaN::

        mean = sum(x) / (n + eps);  var = sum((x - mean)^2) / (n + eps);  cv2 = var / (mean^2 + eps)

    Args:
      x: float[...] any shape (flattened); typically a per-expert vector [E].

    Returns:
      float32 scalar, 0 exactly when all entries are equal.
    """
    x = x.astype(jnp.float32).reshape(-1)
    size = x.shape[0] + CV_EPS
    mean = jnp.sum(x) / size
    var = jnp.sum(jnp.square(x - mean)) / size
    return var / (jnp.square(mean) + CV_EPS)


def importance_loss(gates: jax.Array) -> jax.Array:
    """CV(Importance(X))^2 with Importance(X) = sum_x G(x) (Shazeer et al. 2017, eqs. 6-7).

    Args:
      gates: float[T, E] gate values G(x) (zero for unselected experts; rows of zeros for padding
        tokens, which then add nothing).

    Returns:
      float32 scalar, unweighted (the paper's w_importance lives in the config).
    """
    importance = jnp.sum(gates.astype(jnp.float32), axis=0)  # [E]
    return cv_squared(importance)


def load_loss(load: jax.Array) -> jax.Array:
    """CV(Load(X))^2 (Shazeer et al. 2017, Appendix A, eq. 11).

    Args:
      load: float[E]; Load(X)_i = sum_x P(x, i) from the smooth estimator (eq. 10, see
        ``moe.routing.noisy.prob_in_top_k``), or the true per-expert counts when there is no
        noise (then the loss has no gradient, as in tensor2tensor).

    Returns:
      float32 scalar, unweighted.
    """
    return cv_squared(load)


def switch_balance_loss(
    probs: jax.Array, expert_fraction: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """Load-balancing loss ``E * sum_i f_i * P_i`` (Switch Transformer, §2.2, eqs. 4-6).

    ``P_i`` is the mean router probability of expert ``i`` over the real tokens (differentiable);
    ``f_i`` the fraction of routing choices that picked expert ``i`` (not differentiable). With
    ``f`` normalised to sum to 1 the loss is exactly 1.0 under perfectly uniform routing, which
    equals the code form ``mean_e(f * P) * E^2`` of lingvo / Mesh-TF / flaxformer (papers §11.1);
    GShard Algorithm 1's ``(1/E) sum_e (c_e/S) m_e`` is this divided by ``E^2``.

    Args:
      probs: float[T, E] full softmax router probabilities.
      expert_fraction: float[E] f_i, summing to 1 (treated as a constant).
      token_mask: optional bool[T]; False tokens (padding) do not count in P_i.

    Returns:
      float32 scalar, unweighted (Switch uses alpha = 1e-2).
    """
    probs = probs.astype(jnp.float32)
    num_tokens, num_experts = probs.shape
    valid = _valid_weights(num_tokens, token_mask)
    mean_prob = jnp.sum(probs * valid[:, None], axis=0) / jnp.maximum(jnp.sum(valid), 1.0)  # [E]
    fraction = jax.lax.stop_gradient(expert_fraction.astype(jnp.float32))
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Router z-loss ``(1/B) sum_i (log sum_j exp(x_ij))^2`` (ST-MoE, §3.3, eq. 5).

    Args:
      logits: float[T, E] router logits (computed in float32 here).
      token_mask: optional bool[T]; the mean runs over the True tokens only.

    Returns:
      float32 scalar, unweighted (ST-MoE uses c_z = 1e-3).
    """
    logits = logits.astype(jnp.float32)
    valid = _valid_weights(logits.shape[0], token_mask)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [T]
    return jnp.sum(jnp.square(lse) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
