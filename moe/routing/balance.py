"""Auxiliary-loss-free load balancing: the expert bias update (Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Algorithm 1; DeepSeek-V3
§2.1.2).

Each MoE layer keeps a per-expert bias ``b [E]`` that is added to the router scores for the
top-k *selection* only (``moe.routing.token_choice.top_k(..., bias=b)``); gates and gradients
never see it. After every training step, with ``c_i`` the number of tokens that selected expert
``i`` in that step::

    b_i <- b_i + gamma * sign(mean_j c_j - c_i)

so an overloaded expert becomes less attractive and an underloaded one more (DeepSeek-V3 uses
``gamma = 1e-3``). The load counted is the *selection* (before capacity), as in the paper
(``c_i`` are "the numbers of tokens assigned to each expert" by the gate, which there drops
nothing): the bias steers the selection, so it must see the selection. Counts after capacity
would be clipped at ``C`` and depend on the slot-filling order, hiding part of what the bias
should correct.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """``b + rate * sign(mean(load) - load)``, in float32.

    Args:
      bias: float32[E], the layer's current selection bias.
      load: float[E], the step's selected choices per expert (the ``choices_per_expert``
        routing stat), or anything proportional to it (a mean over routing groups or
        micro-batches): only the sign of ``mean - load_i`` counts.
      rate: gamma, the bias update speed (0 leaves the bias unchanged).

    Returns:
      float32[E], the new bias (``stop_gradient``: no gradient flows through it).
    """
    load = jax.lax.stop_gradient(load.astype(jnp.float32))
    step = jnp.float32(rate) * jnp.sign(jnp.mean(load) - load)
    return (bias.astype(jnp.float32) + step).astype(jnp.float32)
