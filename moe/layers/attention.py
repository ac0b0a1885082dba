"""Multi-head dot-product attention (self or cross, causal or not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.params import param

_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Attention(nnx.Module):
    """Multi-head attention with logical axes ('embed', 'heads', 'kv') on its kernels.

    ``__call__(x [B, Lq, d], kv [B, Lk, d], mask [B, 1|Lq, Lk] bool) -> [B, Lq, d]``. Softmax in
    float32 whatever the compute dtype (ST-MoE §3.4: exponentiated tensors stay float32).
    """

    def __init__(self, d_model: int, num_heads: int, *, dropout: float, dtype, rngs: nnx.Rngs):
        head = d_model // num_heads
        self.num_heads, self.head_dim, self.dtype, self.dropout = num_heads, head, dtype, dropout

        def kernel(shape, names):
            return param(_init(rngs.params(), shape, jnp.float32), names)

        self.w_q = kernel((d_model, num_heads, head), ("embed", "heads", "kv"))
        self.w_k = kernel((d_model, num_heads, head), ("embed", "heads", "kv"))
        self.w_v = kernel((d_model, num_heads, head), ("embed", "heads", "kv"))
        self.w_o = kernel((num_heads, head, d_model), ("heads", "kv", "embed"))

    def __call__(self, x, kv, mask, *, train: bool, rngs: nnx.Rngs | None = None):
        dt = self.dtype
        q = jnp.einsum("bld,dhk->blhk", x.astype(dt), self.w_q[...].astype(dt))  # [B, Lq, H, k]
        k = jnp.einsum("bld,dhk->blhk", kv.astype(dt), self.w_k[...].astype(dt))  # [B, Lk, H, k]
        v = jnp.einsum("bld,dhk->blhk", kv.astype(dt), self.w_v[...].astype(dt))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / jnp.sqrt(
            jnp.float32(self.head_dim)
        )  # [B, H, Lq, Lk]
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if train and self.dropout > 0 and rngs is not None:
            keep = jax.random.bernoulli(rngs.dropout(), 1 - self.dropout, probs.shape)
            probs = jnp.where(keep, probs / (1 - self.dropout), 0.0)
        out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), v)  # [B, Lq, H, k]
        return jnp.einsum("bqhk,hkd->bqd", out, self.w_o[...].astype(dt))


def causal_mask(length: int) -> jax.Array:
    """bool[1, L, L]: position q may attend to positions <= q."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None]
