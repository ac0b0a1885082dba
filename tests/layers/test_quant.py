"""Weight-only quantisation (moe.layers.quant): error bounds, 4-bit packing, bytes, and a
quantised model against its float twin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers import quant
from moe.layers.moe import MoeSpec
from moe.layers.transformer import Transformer, TransformerSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "shape, in_axes", [((16, 24), (0,)), ((3, 8, 10), (1,)), ((4, 6, 8), (1, 0))]
)
def test_round_trip_error_is_at_most_half_a_scale_per_channel(bits, shape, in_axes):
    w = 0.3 * jax.random.normal(jax.random.key(bits), shape)
    w = w.at[(0,) * len(shape)].set(2.5)  # one outlier: its channel gets a coarser scale
    q, scale = quant.quantize(w, bits, in_axes)
    assert scale.shape == tuple(1 if i in in_axes else n for i, n in enumerate(shape))
    back = quant.dequantize(q, scale, in_axes[0])
    err = np.abs(np.asarray(back - w))
    bound = np.broadcast_to(np.asarray(scale) / 2, shape)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    # every channel's largest weight is exactly representable: it defines the scale
    amax = np.max(np.abs(np.asarray(w)), axis=in_axes, keepdims=True)
    np.testing.assert_allclose(np.asarray(scale), amax / quant.qmax(bits), rtol=1e-6)
    values = np.asarray(quant.unpack4(q, in_axes[0]) if bits == 4 else q)
    assert values.min() >= -quant.qmax(bits) and values.max() <= quant.qmax(bits)


def test_4_bit_packing_is_lossless_and_halves_the_bytes():
    values = jnp.asarray(np.arange(-8, 8, dtype=np.int8).repeat(6).reshape(12, 8))
    for axis in (0, 1):
        packed = quant.pack4(values, axis)
        assert packed.dtype == jnp.uint8 and packed.nbytes * 2 == values.nbytes
        np.testing.assert_array_equal(quant.unpack4(packed, axis), values)
    with pytest.raises(ValueError, match="even"):
        quant.pack4(values[:3], 0)


def test_stored_bytes_and_an_all_zero_channel():
    w = jnp.ones((8, 6)).at[:, 2].set(0.0)
    q8, s8 = quant.quantize(w, 8, (0,))
    q4, _ = quant.quantize(w, 4, (0,))
    assert (q8.dtype, q8.nbytes) == (jnp.int8, 48) and (q4.dtype, q4.nbytes) == (jnp.uint8, 24)
    assert float(s8[0, 2]) == 1.0 and not np.any(np.asarray(q8[:, 2]))
    np.testing.assert_array_equal(quant.dequantize(q8, s8, 0), w)


def spec(bits=0, dense=False):
    moe = lambda: MoeSpec(4, top_k=2, capacity_factor_eval=2.0, weight_bits=bits)
    return TransformerSpec(
        kind="encoder_decoder", vocab_size=64, d_model=32, num_heads=2, encoder_layers=2,
        decoder_layers=2, d_ff=64, moe_layers=(("encoder/1", moe()), ("decoder/1", moe())),
        dense_weight_bits=bits if dense else 0,
    )  # fmt: skip


def logits(model):
    src = jax.random.randint(jax.random.key(1), (4, 9), 4, 64)
    tgt = jax.random.randint(jax.random.key(2), (4, 7), 4, 64)
    return model(src, tgt, jnp.zeros(4, jnp.int32))[0]


def dequantised_float_model(qmodel):
    """The float model with every quantised kernel replaced by its dequantised value."""
    model = Transformer(spec(), rngs=nnx.Rngs(0))
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    qstate = dict(nnx.to_flat_state(nnx.state(qmodel, nnx.Param)))
    for path, var in qstate.items():
        axes = var.get_metadata().get("quant_axes")
        if axes is not None:
            scale = qstate[(*path[:-1], f"{path[-1]}_scale")][...]
            state[path][...] = quant.dequantize(var[...], scale, axes[0])
    return model


@pytest.mark.parametrize(
    "bits, dense, tolerance", [(8, False, 2e-3), (8, True, 2e-2), (4, False, 3e-2)]
)
def test_quantised_model_logits_are_close_to_the_float_model(bits, dense, tolerance):
    """Same seed: the quantised model holds the quantisation of the float model's weights.
    It computes exactly the float model with dequantised weights, and close to the float one."""
    ref = logits(Transformer(spec(), rngs=nnx.Rngs(0)))
    qmodel = Transformer(spec(bits, dense), rngs=nnx.Rngs(0))
    got = logits(qmodel)
    np.testing.assert_allclose(got, logits(dequantised_float_model(qmodel)), atol=1e-5)
    rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < rel < tolerance
    experts = nnx.state(qmodel, nnx.Param)["decoder"][1]["ffn"]["experts"]
    assert experts["w_in"][...].dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert experts["w_in_scale"][...].shape == (4, 1, 64)


@pytest.mark.slow
def test_quantised_bank_under_expert_parallelism_matches_the_group_by_group_block():
    """The block's all-to-all path carries the scales into shard_map (4 virtual devices)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("quant_sharded.py")
    result = subprocess.run(
        [sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for bits, err in errors.items():
        assert err["forward"] <= 1e-5 * max(1.0, err["scale"]), bits
