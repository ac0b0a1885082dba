"""The dense feed-forward block: ``y = W_out act(W_in x + b_in) + b_out``.

It is the transformer's ordinary FFN, the "shared expert" beside the routed experts (ST-MoE §5,
App. C), and the baseline the MoE block is benchmarked against (``scripts/bench_moe.py``).
The activation and dropout helpers here are shared with the expert bank (``experts.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers import quant
from moe.layers.params import param

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,  # tanh approximation, as in T5/Switch and flaxformer
    "relu": jax.nn.relu,  # GShard eq. 2: FFN_e(x) = wo_e . ReLU(wi_e . x)
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` ('gelu' or 'relu')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def apply_dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``. ``rate == 0`` returns ``h`` unchanged (and needs no key)."""
    if rate <= 0.0:
        return h
    if key is None:
        raise ValueError(f"dropout rate {rate} in training needs rngs (a 'dropout' stream)")
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


def kernel_init(init_scale: float) -> nnx.Initializer:
    """Truncated normal with variance ``init_scale / fan_in`` (Switch Transformer §2.4 uses
    ``init_scale = 0.1``, 10x below the usual 1.0, for stability)."""
    return jax.nn.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")


class DenseFFN(nnx.Module):
    """Position-wise feed-forward block ``[..., d] -> [..., d]``.

    Parameters (float32, logical axes): ``w_in [d, f]`` ('embed', 'mlp'), ``b_in [f]`` ('mlp',),
    ``w_out [f, d]`` ('mlp', 'embed'), ``b_out [d]`` ('embed',). The matmuls run in ``dtype``
    (bfloat16 allowed); the output has the input's dtype. ``dropout`` applies to the hidden
    activation in training and draws from the ``dropout`` stream of the call's ``rngs``.
    ``weight_bits`` (8 or 4, inference only) stores the kernels quantised (``moe.layers.quant``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        init_scale: float = 0.1,
        weight_bits: int = 0,
        rngs: nnx.Rngs,
    ):
        activation_fn(activation)  # validates the name early
        self.activation = activation
        self.dropout_rate = dropout
        self.dtype = dtype
        init = kernel_init(init_scale)
        q = dict(bits=weight_bits, in_axes=(0,))
        quant.set_kernel(self, "w_in", init(rngs.params(), (d_model, d_ff)), ("embed", "mlp"), **q)
        self.b_in = param(jnp.zeros((d_ff,)), ("mlp",))
        quant.set_kernel(self, "w_out", init(rngs.params(), (d_ff, d_model)), ("mlp", "embed"), **q)
        self.b_out = param(jnp.zeros((d_model,)), ("embed",))

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x [..., d] -> [..., d]`` in ``x.dtype``."""
        dt = self.dtype
        h = jnp.dot(x.astype(dt), quant.weight(self, "w_in", dt)) + self.b_in[...].astype(dt)
        h = activation_fn(self.activation)(h)  # [..., f]
        if train and self.dropout_rate > 0.0:
            h = apply_dropout(h, self.dropout_rate, rngs.dropout() if rngs is not None else None)
        y = jnp.dot(h, quant.weight(self, "w_out", dt)) + self.b_out[...].astype(dt)
        return y.astype(x.dtype)
