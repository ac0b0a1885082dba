"""The MoE block with the DeepSeek routing generation against a dense every-expert reference:
sigmoid gates with a selection bias and a device limit (DeepSeek-V2 §2.1.3, V3 §2.1.2),
fine-grained and shared experts (DeepSeekMoE), and the router bias as model state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers.moe import MoeBlock, MoeSpec
from moe.layers.router import RouterBias

B, S, D, F, E = 2, 8, 8, 12, 8  # T = 16 tokens


def make_block(**spec_kw):
    kw = dict(num_experts=E, top_k=2, capacity_factor_train=0.0, capacity_factor_eval=0.0)
    kw.update(spec_kw)
    block = MoeBlock(D, F, MoeSpec(**kw), causal=False, rngs=nnx.Rngs(0))
    block.router.w_gate[...] = jax.random.normal(jax.random.key(7), block.router.w_gate.shape)
    block.experts.b_out[...] = jax.random.normal(jax.random.key(10), block.experts.b_out.shape)
    if block.router.bias is not None:
        block.router.bias[...] = 0.5 * jax.random.normal(jax.random.key(11), (E,))
    return block


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, D))


def dense_reference(p, x, spec, bias, allowed=None):
    """``y_t = sum_e G[t, e] FFN_e(x_t)`` with G from DeepSeek-V3 eqs. 13-16: s = sigmoid(u);
    the top-k of s + b among the experts of the M devices with the best single s + b; gates
    s / sum(chosen s) times the routed scaling factor. Every expert runs on every token."""
    x_td = x.reshape(-1, D)
    s = jax.nn.sigmoid(x_td @ p["router"]["w_gate"])  # [T, E]
    sel = s + bias
    if allowed is not None:
        sel = jnp.where(allowed, sel, -jnp.inf)
    m, n = spec.device_limit, spec.expert_devices
    if 0 < m < n:
        best = sel.reshape(-1, n, E // n).max(-1)  # [T, D]
        keep = jnp.any(jax.nn.one_hot(jax.lax.top_k(best, m)[1], n, dtype=bool), axis=1)
        sel = jnp.where(jnp.repeat(keep, E // n, axis=1), sel, -jnp.inf)
    idx = jax.lax.top_k(sel, spec.top_k)[1]
    chosen = jax.nn.one_hot(idx, E).sum(1)  # [T, E]
    gates = s * chosen / jnp.sum(s * chosen, -1, keepdims=True) * spec.routed_scaling
    e = p["experts"]
    h = jax.nn.gelu(jnp.einsum("td,edf->etf", x_td, e["w_in"]) + e["b_in"][:, None])
    y = jnp.einsum("etf,efd->etd", h, e["w_out"]) + e["b_out"][:, None]
    return jnp.einsum("te,etd->td", gates, y).reshape(x.shape)


SPECS = [
    dict(gate="sigmoid"),
    dict(gate="sigmoid", selection_bias=True, routed_scaling=2.0),
    dict(gate="sigmoid", selection_bias=True, device_limit=2, expert_devices=4, top_k=3),
    dict(gate="sigmoid", selection_bias=True, device_limit=1, expert_devices=2, expert_d_ff=6),
]


@pytest.mark.parametrize("spec_kw", SPECS, ids=str)
def test_sigmoid_bias_device_limited_block_equals_dense_reference(spec_kw):
    block = make_block(**spec_kw)
    graph, state = nnx.split(block)
    x = inputs()
    ct = jax.random.normal(jax.random.key(3), x.shape)
    bias = block.router.bias[...] if block.router.bias is not None else jnp.zeros(E)
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    run = lambda st, xx: nnx.merge(graph, st)(xx, train=False)[0]  # noqa: E731
    ref = lambda p, xx: dense_reference(p, xx, block.spec, bias)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(run)(state, x), jax.jit(ref)(params, x), rtol=1e-4, atol=1e-5
    )
    g_x = jax.jit(jax.grad(lambda xx: jnp.vdot(run(state, xx), ct)))(x)
    g_x_ref = jax.jit(jax.grad(lambda xx: jnp.vdot(ref(params, xx), ct)))(x)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
    g_router = jax.jit(jax.grad(lambda st: jnp.vdot(run(st, x), ct)))(state)
    assert float(jnp.abs(g_router["router"]["w_gate"][...]).sum()) > 0
    if block.router.bias is not None:
        np.testing.assert_array_equal(g_router["router"]["bias"][...], 0.0)


def test_the_router_bias_is_model_state_but_not_a_parameter():
    block = make_block(gate="sigmoid", selection_bias=True)
    assert isinstance(block.router.bias, RouterBias) and block.router.bias.shape == (E,)
    params = nnx.state(block, nnx.Param)
    assert "bias" not in params["router"]
    assert jax.tree.leaves(nnx.state(block, RouterBias))[0].shape == (E,)
    assert make_block(gate="sigmoid").router.bias is None  # only where balancing asks for it


def test_the_bias_never_pulls_a_token_to_a_masked_expert():
    block = make_block(gate="sigmoid", selection_bias=True)
    block.router.bias[...] = jnp.zeros(E).at[3].set(100.0)  # expert 3 would win every token
    allowed = jnp.ones((B, S, E), bool).at[0].set(jnp.arange(E) != 3)  # row 0 may not use it
    graph, state = nnx.split(block)

    @jax.jit
    def routing(state, x, mask):
        b = nnx.merge(graph, state)
        return b.route(x.reshape(-1, D), train=False, expert_mask=mask.reshape(-1, E))

    r = routing(state, inputs(), allowed)
    taken = np.asarray(r.slot_token[3])
    assert not np.isin(taken, np.arange(S)).any()  # no token of row 0 in expert 3
    assert np.isin(np.arange(S, 2 * S), taken).all()  # every token of row 1 is


def test_fine_grained_and_shared_experts_have_their_widths():
    block = make_block(expert_d_ff=3, num_shared_experts=2)
    assert block.experts.w_in.shape == (E, D, 3) and block.experts.w_out.shape == (E, 3, D)
    assert block.shared.w_in.shape == (D, 6)  # two shared experts of width 3, side by side
    assert make_block().shared is None


def test_n_shared_experts_are_the_sum_of_n_ffns():
    block = make_block(expert_d_ff=3, num_shared_experts=2, top_k=1)
    x = inputs().reshape(-1, D)
    sh = block.shared
    w_in, b_in, w_out, b_out = sh.w_in[...], sh.b_in[...], sh.w_out[...], sh.b_out[...]

    def ffn(cols):
        return jax.nn.gelu(x @ w_in[:, cols] + b_in[cols]) @ w_out[cols]

    want = ffn(slice(0, 3)) + ffn(slice(3, 6)) + b_out
    np.testing.assert_allclose(sh(x, train=False), want, rtol=1e-5, atol=1e-5)


def test_spec_rejects_deepseek_options_on_other_routers():
    with pytest.raises(ValueError, match="token_choice"):
        MoeSpec(num_experts=4, router="noisy", gate="sigmoid")
    with pytest.raises(ValueError, match="expert_devices=3"):
        MoeSpec(num_experts=4, expert_devices=3)
