"""PowerSign and AddSign (Bello, Zoph, Vasudevan & Le, ICML 2017, "Neural Optimizer Search with
Reinforcement Learning", arXiv 1709.07417 §5; papers §8.2) as optax transformations.

The two update rules the search found, with ``m`` the moving average of the gradient::

    m_t = β m_{t-1} + (1 - β) g_t                          (m_0 = 0, β = 0.9)
    PowerSign:  u_t = α ^ (f(t) sign(g_t) sign(m_t)) g_t     (α = e)
    AddSign:    u_t = (α + f(t) sign(g_t) sign(m_t)) g_t     (α = 1)
    w_t = w_{t-1} - lr_t u_t

so the step grows where the gradient agrees in sign with its running average and shrinks where
it does not (sign(0) = 0 leaves ``g`` as it is). ``m_t`` is the average *after* this step's
gradient is folded in, as in TensorFlow's official kernels (``ApplyPowerSign``/``ApplyAddSign``
update ``m`` first). ``f(t)`` is the optional *sign decay* (the paper's -ld/-cd/-rd variants;
``tensorflow/contrib/opt/python/training/sign_decay.py``), with ``T`` the decay steps, ``n`` the
number of periods and ``t`` clipped to ``T``:

    constant:  f(t) = 1
    linear:    f(t) = max(0, (T - t) / T)                              (ld)
    cyclical:  f(t) = 0.5 (1 + cos(2π n t / T)),  n = 0.5 by default  (cd; TF "cosine decay")
    restart:   f(t) = 0.5 (1 + cos(π ((n t) mod T) / T)),  n = 1 by default
                                                                       (rd; SGDR-style restarts)

``t`` counts the updates already applied (0 for the first one), as TF passes ``global_step``
before incrementing it. The learning-rate schedule and gradient clipping stay outside, in the
optax chain (``moe.training.build``).

optax (0.2.8) ships neither rule (no ``powersign``/``addsign`` in ``optax`` or
``optax.contrib``; ``optax.sign_sgd``/``signum`` are different rules), so they are written
here: one state (a step count and ``m``, shaped like the parameters, so it is sharded like them
and checkpointed with the rest of the train state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SIGN_DECAYS = ("constant", "linear", "cyclical", "restart")
DEFAULT_PERIODS = {"cyclical": 0.5, "restart": 1.0}  # TF's num_periods defaults
DEFAULT_ALPHA = {"powersign": math.e, "addsign": 1.0}


def sign_decay(kind: str, decay_steps: int, periods: float | None = None) -> Callable:
    """``f(t)`` of the module docstring: a function of the (int) update count, float32."""
    if kind not in SIGN_DECAYS:
        raise ValueError(f"sign decay {kind!r} is not one of {SIGN_DECAYS}")
    if decay_steps < 1:
        raise ValueError(f"decay_steps={decay_steps} must be >= 1")
    n = DEFAULT_PERIODS.get(kind, 1.0) if periods is None else periods
    steps = float(decay_steps)

    def f(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), steps)
        if kind == "constant":
            return jnp.ones((), jnp.float32)
        if kind == "linear":
            return jnp.maximum(0.0, (steps - t) / steps)
        if kind == "cyclical":
            return 0.5 * (1.0 + jnp.cos(2.0 * jnp.pi * n * t / steps))
        return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.mod(n * t, steps) / steps))

    return f


class SignState(NamedTuple):
    """``count``: int32, updates applied; ``m``: the moving average of the gradient."""

    count: jax.Array
    m: optax.Updates


def _scale_by_sign_rule(rule: str, alpha: float, beta: float, decay: Callable | None):
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1)")
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} must be > 0")
    log_alpha = math.log(alpha)

    def init(params):
        m = jax.tree.map(jnp.zeros_like, params)
        return SignState(count=jnp.zeros((), jnp.int32), m=m)

    def update(updates, state, params=None):
        del params
        f = jnp.ones((), jnp.float32) if decay is None else decay(state.count)
        m = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, state.m, updates)

        def one(g, m):
            agree = f * jnp.sign(g) * jnp.sign(m)  # in [-f, f]
            scale = jnp.exp(log_alpha * agree) if rule == "powersign" else alpha + agree
            return (scale * g).astype(g.dtype)

        out = jax.tree.map(one, updates, m)
        return out, SignState(count=optax.safe_int32_increment(state.count), m=m)

    return optax.GradientTransformation(init, update)


def scale_by_power_sign(
    alpha: float = math.e, beta: float = 0.9, decay: Callable | None = None
) -> optax.GradientTransformation:
    """``g -> α^(f(t) sign(g) sign(m)) g`` (module docstring); no learning rate."""
    return _scale_by_sign_rule("powersign", alpha, beta, decay)


def scale_by_add_sign(
    alpha: float = 1.0, beta: float = 0.9, decay: Callable | None = None
) -> optax.GradientTransformation:
    """``g -> (α + f(t) sign(g) sign(m)) g`` (module docstring); no learning rate."""
    return _scale_by_sign_rule("addsign", alpha, beta, decay)


def power_sign(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = math.e,
    beta: float = 0.9,
    decay: Callable | None = None,
) -> optax.GradientTransformation:
    """PowerSign with a learning rate (or schedule): ``w -= lr_t α^(f sign(g) sign(m)) g``."""
    return optax.chain(
        scale_by_power_sign(alpha, beta, decay), optax.scale_by_learning_rate(learning_rate)
    )


def add_sign(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 1.0,
    beta: float = 0.9,
    decay: Callable | None = None,
) -> optax.GradientTransformation:
    """AddSign with a learning rate (or schedule): ``w -= lr_t (α + f sign(g) sign(m)) g``."""
    return optax.chain(
        scale_by_add_sign(alpha, beta, decay), optax.scale_by_learning_rate(learning_rate)
    )
