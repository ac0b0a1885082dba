"""DenseFFN against the formula written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers.dense import DenseFFN, apply_dropout


def numpy_ffn(m: DenseFFN, x, act):
    w_in, b_in = np.asarray(m.w_in[...]), np.asarray(m.b_in[...])
    w_out, b_out = np.asarray(m.w_out[...]), np.asarray(m.b_out[...])
    return act(np.asarray(x) @ w_in + b_in) @ w_out + b_out


def gelu_tanh(h):
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


@pytest.mark.parametrize(
    "activation, act", [("gelu", gelu_tanh), ("relu", lambda h: np.maximum(h, 0))]
)
def test_dense_ffn_matches_the_formula(activation, act):
    m = DenseFFN(6, 10, activation=activation, init_scale=1.0, rngs=nnx.Rngs(0))
    m.b_in[...] = jax.random.normal(jax.random.key(1), (10,))
    x = jax.random.normal(jax.random.key(2), (2, 3, 6))
    y = m(x, train=False)
    assert y.shape == (2, 3, 6) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, numpy_ffn(m, x, act), rtol=1e-5, atol=1e-5)


def test_dense_ffn_params_carry_logical_axes():
    state = nnx.state(DenseFFN(4, 8, rngs=nnx.Rngs(0)))
    axes = {k: v.get_metadata()["out_sharding"] for k, v in state.items()}
    assert axes == {
        "w_in": ("embed", "mlp"),
        "b_in": ("mlp",),
        "w_out": ("mlp", "embed"),
        "b_out": ("embed",),
    }


def test_dropout_only_in_training_and_needs_rngs():
    m = DenseFFN(4, 64, dropout=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    np.testing.assert_array_equal(m(x, train=False), m(x, train=False))
    y_train = m(x, train=True, rngs=nnx.Rngs(dropout=3))
    assert not np.allclose(y_train, m(x, train=False))
    with pytest.raises(ValueError, match="rngs"):
        m(x, train=True)


def test_inverted_dropout_zeroes_and_rescales():
    h = jnp.ones((1000,))
    out = np.asarray(apply_dropout(h, 0.25, jax.random.key(0)))
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.15 < np.mean(out == 0) < 0.35


def test_bfloat16_compute_is_close_and_keeps_input_dtype():
    f32 = DenseFFN(8, 16, rngs=nnx.Rngs(0))
    bf16 = DenseFFN(8, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = bf16(x, train=False)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, f32(x, train=False), rtol=0.05, atol=0.02)
