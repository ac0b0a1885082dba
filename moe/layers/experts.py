"""The expert bank: ``E`` feed-forward experts applied to per-expert token buffers ``[E, C, d]``.

Each expert is the GShard/Switch FFN ``FFN_e(x) = W_out_e act(W_in_e x + b_in_e) + b_out_e``
(GShard §2.2 eq. 2), run for all experts at once as batched matmuls (GShard Algorithm 2,
``EGCM,EMH->EGCH``). The math is the pure function :func:`apply_experts`, so expert parallelism can
call it inside ``shard_map`` with its local slice of the weights (``E' = E / EP`` experts, buffers
``[E', EP * C, d]``); :class:`ExpertBank` only owns the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers import quant
from moe.layers.dense import activation_fn, apply_dropout
from moe.layers.params import param

# A bank's kernels contract over axis 1 ([E, d, f], [E, f, d]): the axis quantised weights pack.
_IN_AXIS = 1


def _kernel(w: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    return w.astype(dtype) if scale is None else quant.dequantize(w, scale, _IN_AXIS, dtype)


def apply_experts(
    w_in: jax.Array,
    b_in: jax.Array,
    w_out: jax.Array,
    b_out: jax.Array,
    buffers: jax.Array,
    *,
    activation: str = "gelu",
    dtype: jnp.dtype = jnp.float32,
    dropout: float = 0.0,
    dropout_key: jax.Array | None = None,
    w_in_scale: jax.Array | None = None,
    w_out_scale: jax.Array | None = None,
) -> jax.Array:
    """Run expert ``e`` on every row of ``buffers[e]``.

    Args:
      w_in: ``[E', d, f]``; b_in: ``[E', f]``; w_out: ``[E', f, d]``; b_out: ``[E', d]`` — the
        weights of the ``E'`` experts held here (all of them, or a local slice under expert
        parallelism).
      buffers: ``[E', C, d]`` token rows per expert (empty slots may hold anything; their
        outputs are ignored by the combine, whose weight for them is 0).
      activation: 'gelu' or 'relu'.
      dtype: compute dtype of the matmuls (bfloat16 allowed); weights are cast to it.
      dropout: expert dropout on the hidden activation (Switch §2.4 uses 0.4 for fine-tuning);
        applied only when ``dropout_key`` is given.
      dropout_key: PRNG key for the dropout mask, or None (no dropout: evaluation).
      w_in_scale, w_out_scale: ``[E', 1, f]``, ``[E', 1, d]`` when ``w_in``/``w_out`` are stored
        quantised (int8, or packed uint8 at 4 bits; ``moe.layers.quant``), else None.

    Returns:
      ``[E', C, d]`` expert outputs in ``dtype``.
    """
    x = buffers.astype(dtype)
    h = jnp.einsum("ecd,edf->ecf", x, _kernel(w_in, w_in_scale, dtype))  # [E', C, f]
    h = activation_fn(activation)(h + b_in.astype(dtype)[:, None, :])
    if dropout_key is not None:
        h = apply_dropout(h, dropout, dropout_key)
    y = jnp.einsum("ecf,efd->ecd", h, _kernel(w_out, w_out_scale, dtype))  # [E', C, d]
    return y + b_out.astype(dtype)[:, None, :]


class ExpertBank(nnx.Module):
    """Parameters of ``num_experts`` FFN experts; ``__call__(buffers [E, C, d]) -> [E, C, d]``.

    Parameters (float32, logical axes): ``w_in [E, d, f]`` ('expert', 'embed', 'mlp'),
    ``b_in [E, f]`` ('expert', 'mlp'), ``w_out [E, f, d]`` ('expert', 'mlp', 'embed'),
    ``b_out [E, d]`` ('expert', 'embed'). Kernels use the Switch reduced-scale init (§2.4),
    fan-in per expert. With ``weight_bits`` (8 or 4) the kernels are the quantisation of that
    init and ``w_in_scale [E, 1, f]``, ``w_out_scale [E, 1, d]`` join them (inference only).
    """

    def __init__(
        self,
        num_experts: int,
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
        init = jax.nn.initializers.variance_scaling(
            init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        e, d, f = num_experts, d_model, d_ff
        q = dict(bits=weight_bits, in_axes=(_IN_AXIS,))
        quant.set_kernel(
            self, "w_in", init(rngs.params(), (e, d, f)), ("expert", "embed", "mlp"), **q
        )
        self.b_in = param(jnp.zeros((e, f)), ("expert", "mlp"))
        quant.set_kernel(
            self, "w_out", init(rngs.params(), (e, f, d)), ("expert", "mlp", "embed"), **q
        )
        self.b_out = param(jnp.zeros((e, d)), ("expert", "embed"))

    @property
    def param_names(self) -> tuple[str, ...]:
        """The bank's parameters: w_in, b_in, w_out, b_out (+ the scales when quantised)."""
        names = ("w_in", "w_in_scale", "b_in", "w_out", "w_out_scale", "b_out")
        return tuple(n for n in names if hasattr(self, n))

    def scales(self) -> dict[str, jax.Array]:
        """``{"w_in_scale": ..., "w_out_scale": ...}`` of a quantised bank, else ``{}``."""
        return {n: getattr(self, n)[...] for n in ("w_in_scale", "w_out_scale") if hasattr(self, n)}

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def __call__(
        self, buffers: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """``buffers [E, C, d] -> [E, C, d]`` in the compute dtype; expert dropout in training
        draws from the ``dropout`` stream of ``rngs``."""
        key = None
        if train and self.dropout_rate > 0.0:
            if rngs is None:
                raise ValueError(f"expert dropout {self.dropout_rate} in training needs rngs")
            key = rngs.dropout()
        return apply_experts(
            self.w_in[...],
            self.b_in[...],
            self.w_out[...],
            self.b_out[...],
            buffers,
            activation=self.activation,
            dtype=self.dtype,
            dropout=self.dropout_rate,
            dropout_key=key,
            **self.scales(),
        )
