"""Weight-only quantisation for inference (``moe quantize``): integer kernels, one float32 scale
per output channel.

    s_c = max_i |W[i, c]| / qmax        q = clip(round(W / s_c), -qmax, qmax)        W ~ q * s_c

with ``qmax = 2**(bits - 1) - 1`` (127 at 8 bits, 7 at 4 bits), ``i`` the kernel's input
(contracting) axes and ``c`` all the others (for an expert bank ``w_in [E, d, f]``: one scale per
expert and hidden unit). Rounding to nearest bounds the error by ``|W - q s_c| <= s_c / 2``.
Symmetric with zero point 0, per output channel: TFLite's int8 weight scheme (Jacob et al. 2018
§2.3; papers §8.3), since a weight zero point would cost a correction term in every matmul.

Storage: 8-bit values as ``int8``; 4-bit values two to a byte as ``uint8`` (low nibble = even
index), packed along the first listed input axis, so the stored array really is half the size.
A scale keeps the kernel's rank (size 1 on the input axes): it broadcasts against the kernel and
shards like it. A layer built with ``bits`` holds ``<name>`` (the integers, whose ``quant_axes``
metadata lists the input axes) and ``<name>_scale`` (:func:`set_kernel`), and reads the
dequantised kernel inside its jitted program (:func:`weight`): weights live as integers, the
matmul runs in the compute dtype. XLA:CPU has no faster integer matmul to use instead: for the
quickstart's expert matmul ``[8, 256, 128] x [8, 128, 512]``, int8 x int8 -> int32 with the
activations quantised per row took 8.6 / 10.0 ms against float32's 8.6 / 9.4 ms in two runs of
``scripts/bench_serving.py`` (a loaded 2-core host), and it would change the activations' numerics.

Why no library: qwix 0.1.8 (which does run on jax 0.10.2 / flax 0.12.8) finds a weight by
intercepting ``jnp.einsum`` and matching the operand to a module parameter; with routing groups
per device our expert weights reach the einsum through ``shard_map``
(``moe.parallel.expert_parallel.moe_exchange``), so qwix left every expert bank float32, the one
thing this is for, and it stores ``w/array/{qvalue,scale}``, a tree our sharding rules and
checkpoints do not name. aqtp 0.9.0 injects a ``dot_general`` into Flax linen or Pax layers and
has no NNX API. The few lines here keep one parameter tree, sharded and checkpointed like the
float model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.params import param

BITS = (4, 8)


def qmax(bits: int) -> int:
    """Largest integer magnitude stored at ``bits`` bits (symmetric range)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    return 2 ** (bits - 1) - 1


def quantize(w: jax.Array, bits: int, in_axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """``(q, scale)`` of kernel ``w``: ``q`` int8 (8 bits) or packed uint8 (4 bits, half as long
    on ``in_axes[0]``, which must be even); ``scale`` float32 of ``w``'s rank, 1 on
    ``in_axes``. An all-zero channel gets scale 1 (and q = 0)."""
    top = qmax(bits)
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(in_axes), keepdims=True)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    q = jnp.clip(jnp.round(w / scale), -top, top).astype(jnp.int8)
    return (pack4(q, in_axes[0]) if bits == 4 else q), scale


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` in ``dtype``; ``q`` uint8 is unpacked along ``axis`` first (4 bits)."""
    values = unpack4(q, axis) if q.dtype == jnp.uint8 else q
    return (values.astype(jnp.float32) * scale).astype(dtype)


def pack4(q: jax.Array, axis: int) -> jax.Array:
    """int8 values in [-8, 7], ``[..., 2n, ...]`` -> uint8 ``[..., n, ...]`` along ``axis``."""
    if q.shape[axis] % 2:
        raise ValueError(f"4-bit packing needs an even axis {axis}; shape {q.shape}")
    nibbles = jax.lax.bitcast_convert_type(q, jnp.uint8) & 0x0F
    lo = jax.lax.slice_in_dim(nibbles, 0, None, 2, axis)
    hi = jax.lax.slice_in_dim(nibbles, 1, None, 2, axis)
    return lo | (hi << 4)


def unpack4(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`pack4`: uint8 ``[..., n, ...]`` -> int8 ``[..., 2n, ...]``."""
    s = jax.lax.bitcast_convert_type(packed, jnp.int8)
    lo = jnp.left_shift(s, 4) >> 4  # arithmetic shifts sign-extend the low nibble
    hi = s >> 4
    both = jnp.stack([lo, hi], axis=axis + 1)  # [..., n, 2, ...]
    shape = packed.shape
    return both.reshape(*shape[:axis], 2 * shape[axis], *shape[axis + 1 :])


def set_kernel(
    module: nnx.Module,
    name: str,
    value: jax.Array,
    axes: tuple[str | None, ...],
    *,
    bits: int,
    in_axes: Sequence[int],
) -> None:
    """Give ``module`` the kernel ``name``: ``param(value, axes)`` for ``bits == 0``, else the
    quantised ``name`` (integers, metadata ``quant_axes=in_axes``) and ``name + '_scale'``
    (float32, input axes replicated)."""
    if not bits:
        setattr(module, name, param(value, axes))
        return
    q, scale = quantize(value, bits, in_axes)
    setattr(module, name, nnx.Param(q, out_sharding=axes, eager_sharding=False, quant_axes=in_axes))
    scale_axes = tuple(None if i in in_axes else a for i, a in enumerate(axes))
    setattr(module, f"{name}_scale", param(scale, scale_axes))


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """Kernel ``name`` of ``module`` in ``dtype``, dequantised when it is stored quantised."""
    kernel = getattr(module, name)
    scale = getattr(module, f"{name}_scale", None)
    if scale is None:
        return kernel[...].astype(dtype)
    return dequantize(kernel[...], scale[...], kernel.get_metadata()["quant_axes"][0], dtype)
