"""Multi-head dot-product attention (self or cross, causal or not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers import quant

_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Attention(nnx.Module):
    """Multi-head attention with logical axes ('embed', 'heads', 'kv') on its kernels.

    ``__call__(x [B, Lq, d], kv [B, Lk, d], mask [B, 1|Lq, Lk] bool) -> [B, Lq, d]``. Softmax in
    float32 whatever the compute dtype (ST-MoE §3.4: exponentiated tensors stay float32).
    ``weight_bits`` (8 or 4, inference only) stores the kernels quantised (``moe.layers.quant``):
    one scale per output channel (head and head dim for q/k/v, model dim for the output).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, dropout: float, dtype, rngs: nnx.Rngs,
        weight_bits: int = 0,
    ):  # fmt: skip
        head = d_model // num_heads
        self.num_heads, self.head_dim, self.dtype, self.dropout = num_heads, head, dtype, dropout

        def kernel(name, shape, names, in_axes):
            value = _init(rngs.params(), shape, jnp.float32)
            quant.set_kernel(self, name, value, names, bits=weight_bits, in_axes=in_axes)

        kernel("w_q", (d_model, num_heads, head), ("embed", "heads", "kv"), (0,))
        kernel("w_k", (d_model, num_heads, head), ("embed", "heads", "kv"), (0,))
        kernel("w_v", (d_model, num_heads, head), ("embed", "heads", "kv"), (0,))
        # w_o contracts over (heads, kv); 4-bit values pack along kv (the head dim, even).
        kernel("w_o", (num_heads, head, d_model), ("heads", "kv", "embed"), (1, 0))

    def __call__(self, x, kv, mask, *, train: bool, rngs: nnx.Rngs | None = None):
        dt = self.dtype
        w = lambda name: quant.weight(self, name, dt)
        q = jnp.einsum("bld,dhk->blhk", x.astype(dt), w("w_q"))  # [B, Lq, H, k]
        k = jnp.einsum("bld,dhk->blhk", kv.astype(dt), w("w_k"))  # [B, Lk, H, k]
        v = jnp.einsum("bld,dhk->blhk", kv.astype(dt), w("w_v"))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / jnp.sqrt(
            jnp.float32(self.head_dim)
        )  # [B, H, Lq, Lk]
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if train and self.dropout > 0 and rngs is not None:
            keep = jax.random.bernoulli(rngs.dropout(), 1 - self.dropout, probs.shape)
            probs = jnp.where(keep, probs / (1 - self.dropout), 0.0)
        out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), v)  # [B, Lq, H, k]
        return jnp.einsum("bqhk,hkd->bqd", out, w("w_o"))


def causal_mask(length: int) -> jax.Array:
    """bool[1, L, L]: position q may attend to positions <= q."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None]
