"""The expert bank against a Python loop over experts; slices of experts (expert parallelism)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers.experts import ExpertBank, apply_experts


def loop_reference(bank: ExpertBank, buffers):
    """Expert e's FFN on each row of buffers[e], one expert at a time."""
    w_in, b_in = np.asarray(bank.w_in[...]), np.asarray(bank.b_in[...])
    w_out, b_out = np.asarray(bank.w_out[...]), np.asarray(bank.b_out[...])
    out = []
    for e in range(w_in.shape[0]):
        h = np.asarray(jax.nn.gelu(buffers[e] @ w_in[e] + b_in[e]))
        out.append(h @ w_out[e] + b_out[e])
    return np.stack(out)


def make_bank(num_experts=4, d=6, f=10, **kwargs):
    bank = ExpertBank(num_experts, d, f, init_scale=1.0, rngs=nnx.Rngs(0), **kwargs)
    bank.b_in[...] = jax.random.normal(jax.random.key(5), bank.b_in.shape)
    bank.b_out[...] = jax.random.normal(jax.random.key(6), bank.b_out.shape)
    return bank


def test_expert_bank_matches_a_loop_over_experts():
    bank = make_bank()
    buffers = jax.random.normal(jax.random.key(1), (4, 3, 6))
    y = bank(buffers, train=False)
    assert y.shape == (4, 3, 6)
    np.testing.assert_allclose(y, loop_reference(bank, buffers), rtol=1e-5, atol=1e-5)


def test_apply_experts_on_a_slice_equals_that_slice_of_the_full_bank():
    bank = make_bank()
    buffers = jax.random.normal(jax.random.key(1), (4, 3, 6))
    full = bank(buffers, train=False)
    local = slice(2, 4)  # the experts one device holds under expert parallelism
    part = apply_experts(
        bank.w_in[local],
        bank.b_in[local],
        bank.w_out[local],
        bank.b_out[local],
        buffers[local],
        activation="gelu",
    )
    np.testing.assert_allclose(part, full[local], rtol=1e-6, atol=1e-6)


def test_expert_params_carry_logical_axes_and_shapes():
    state = nnx.state(ExpertBank(3, 4, 8, rngs=nnx.Rngs(0)))
    got = {k: (v.shape, v.get_metadata()["out_sharding"]) for k, v in state.items()}
    assert got == {
        "w_in": ((3, 4, 8), ("expert", "embed", "mlp")),
        "b_in": ((3, 8), ("expert", "mlp")),
        "w_out": ((3, 8, 4), ("expert", "mlp", "embed")),
        "b_out": ((3, 4), ("expert", "embed")),
    }


def test_expert_dropout_applies_in_training_only():
    bank = make_bank(dropout=0.4)
    buffers = jax.random.normal(jax.random.key(1), (4, 3, 6))
    y_eval = bank(buffers, train=False)
    np.testing.assert_allclose(y_eval, loop_reference(bank, buffers), rtol=1e-5, atol=1e-5)
    y_train = bank(buffers, train=True, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(y_train, y_eval)
    with pytest.raises(ValueError, match="rngs"):
        bank(buffers, train=True)


def test_bfloat16_experts_are_close_to_float32():
    bank = make_bank()
    buffers = jax.random.normal(jax.random.key(1), (4, 3, 6))
    w = [bank.w_in[...], bank.b_in[...], bank.w_out[...], bank.b_out[...]]
    y16 = apply_experts(*w, buffers, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    y32 = apply_experts(*w, buffers)
    scale = float(np.abs(y32).max())
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.02 * scale)
