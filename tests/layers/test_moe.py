"""The MoE block against a dense reference that runs every expert on every token.

With no capacity limit (cf <= 0) the block must equal ``y_t = sum_e G[t, e] FFN_e(x_t)`` where
``G`` is written out from each routing rule's paper definition; outputs and gradients (router,
experts, input) are compared. Then the behaviours around it: dropped and padding tokens give 0,
expert masks, bf16, the shared expert, stats, and no [T, E, C] tensor anywhere.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.layers.moe import MoeBlock, MoeSpec, combine, dispatch
from moe.layers.router import MASKED_LOGIT

B, S, D, F, E = 2, 8, 8, 12, 4  # T = 16 tokens


def make_block(**spec_kw):
    kw = dict(num_experts=E, top_k=2, capacity_factor_train=0.0, capacity_factor_eval=0.0)
    kw.update(spec_kw)
    spec = MoeSpec(**kw)
    block = MoeBlock(D, F, spec, causal=False, rngs=nnx.Rngs(0))
    # Larger router weights than the default init, so gates are far from uniform.
    block.router.w_gate[...] = jax.random.normal(jax.random.key(7), block.router.w_gate.shape)
    if block.router.w_primary is not None:
        block.router.w_primary[...] = jax.random.normal(
            jax.random.key(8), block.router.w_primary.shape
        )
    block.experts.b_in[...] = jax.random.normal(jax.random.key(9), block.experts.b_in.shape)
    block.experts.b_out[...] = jax.random.normal(jax.random.key(10), block.experts.b_out.shape)
    return block


def call(block, x, *, train=False, seed=None, method="__call__", **arrays):
    """``block.<method>(x, train=..., rngs=..., **arrays)`` compiled as one program (eager
    op-by-op execution would compile every primitive separately, which is slow)."""
    graph, state = nnx.split(block)

    @jax.jit
    def run(state, x, arrays, key):
        rngs = None if key is None else nnx.Rngs(router=key, dropout=key)
        return getattr(nnx.merge(graph, state), method)(x, train=train, rngs=rngs, **arrays)

    return run(state, x, arrays, None if seed is None else jax.random.key(seed))


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, D))


# --- the dense reference ---------------------------------------------------------------------


def every_expert(p, x_td):
    """[E, T, d]: each expert's FFN on every token."""
    e = p["experts"]
    h = jax.nn.gelu(jnp.einsum("td,edf->etf", x_td, e["w_in"]) + e["b_in"][:, None])
    return jnp.einsum("etf,efd->etd", h, e["w_out"]) + e["b_out"][:, None]


def top_k_dense(values, k, gate_fn):
    """[T, E] gates: gate_fn(top-k values) placed at the top-k positions, 0 elsewhere."""
    top, idx = jax.lax.top_k(values, k)
    return jnp.einsum("tk,tke->te", gate_fn(top), jax.nn.one_hot(idx, values.shape[-1]))


def dense_gates(p, h_td, spec, allowed=None):
    """G[t, e] of each router with no capacity, from the papers' definitions."""
    logits = h_td @ p["router"]["w_gate"]
    if allowed is not None:
        logits = jnp.where(allowed, logits, MASKED_LOGIT)
    k = spec.top_k
    if spec.router == "token_choice":  # GShard Alg. 1: top-k of softmax, renormalised
        return top_k_dense(jax.nn.softmax(logits), k, lambda g: g / g.sum(-1, keepdims=True))
    if spec.router == "noisy":  # Shazeer eq. 3 without noise: softmax over the kept logits
        return top_k_dense(logits, k, jax.nn.softmax)
    if spec.router == "expert_choice":  # C = T: every expert takes every token at gate p
        return jax.nn.softmax(logits)
    a = spec.num_groups  # hierarchical, Shazeer App. B: G_primary(x)_a * G_a(x)_b
    primary = top_k_dense(h_td @ p["router"]["w_primary"], k, jax.nn.softmax)  # [T, A]
    secondary = logits.reshape(-1, a, E // a)
    gs = jax.vmap(lambda s: top_k_dense(s, k, jax.nn.softmax), in_axes=1, out_axes=1)(secondary)
    return (primary[:, :, None] * gs).reshape(-1, E)


def reference(p, x, spec, allowed=None, router_bias=None):
    x_td = x.reshape(-1, D)
    h = x_td if router_bias is None else x_td + router_bias.reshape(-1, D)
    if allowed is None:
        gates = dense_gates(p, h, spec)
    else:  # masked logits, and a masked expert never gets the token (even an all-masked one)
        gates = dense_gates(p, h, spec, allowed.reshape(-1, E)) * allowed.reshape(-1, E)
    return jnp.einsum("te,etd->td", gates, every_expert(p, x_td)).reshape(x.shape)


def block_fn(block, **call_kw):
    graph, state = nnx.split(block)

    @jax.jit
    def run(state, x):
        y, _ = nnx.merge(graph, state)(x, train=False, **call_kw)
        return y

    return run, state


ROUTERS = [
    dict(router="token_choice", top_k=1),
    dict(router="token_choice", top_k=2),
    dict(router="noisy", top_k=2),
    dict(router="expert_choice", top_k=2),
    dict(router="hierarchical", top_k=1, num_groups=2),
    dict(router="hierarchical", top_k=2, num_groups=2),
]


@pytest.mark.parametrize("spec_kw", ROUTERS, ids=lambda kw: f"{kw['router']}-k{kw['top_k']}")
def test_dropless_block_equals_dense_reference_outputs_and_gradients(spec_kw):
    block = make_block(**spec_kw)
    run, state = block_fn(block)
    x = inputs()
    ct = jax.random.normal(jax.random.key(3), x.shape)
    params = nnx.to_pure_dict(state)

    np.testing.assert_allclose(
        run(state, x),
        jax.jit(reference, static_argnums=2)(params, x, block.spec),
        rtol=1e-4,
        atol=1e-5,
    )
    g_state, g_x = jax.jit(jax.grad(lambda s, xx: jnp.vdot(run(s, xx), ct), argnums=(0, 1)))(
        state, x
    )
    g_params, g_x_ref = jax.jit(
        jax.grad(lambda p, xx: jnp.vdot(reference(p, xx, block.spec), ct), argnums=(0, 1))
    )(params, x)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
    got, want = nnx.to_pure_dict(g_state), g_params
    for path, g in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_allclose(
            _at(got, path), g, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
    if spec_kw["top_k"] > 1:  # top-1 of a softmax over one kept value is a constant gate
        router_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(got["router"]))
        assert router_grad > 0  # the router is trained through the combine weights


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_dispatch_and_combine_match_loops_with_empty_slots():
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    slot_token = np.array([[4, 0, -1], [1, -1, -1]], np.int32)  # [E=2, C=3]
    slot_weight = np.array([[0.5, 2.0, 0.0], [3.0, 0.0, 0.0]], np.float32)
    buffers = dispatch(jnp.asarray(x), jnp.asarray(slot_token))
    want = np.zeros((2, 3, 3), np.float32)
    y_want = np.zeros((5, 3), np.float32)
    for e in range(2):
        for c in range(3):
            if slot_token[e, c] >= 0:
                want[e, c] = x[slot_token[e, c]]
                y_want[slot_token[e, c]] += slot_weight[e, c] * want[e, c]
    np.testing.assert_array_equal(buffers, want)
    y = combine(buffers, jnp.asarray(slot_token), jnp.asarray(slot_weight), 5)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_want)


def test_dropped_tokens_give_exactly_zero():
    # T=16, E=4, k=1, cf=0.25 -> 1 slot per expert: at most 4 tokens get an expert.
    block = make_block(top_k=1, capacity_factor_eval=0.25)
    x = inputs()
    y, aux = call(block, x)
    routing = call(block, x.reshape(-1, D), method="route")
    routed = np.zeros(B * S, bool)
    routed[np.asarray(routing.slot_token)[np.asarray(routing.slot_token) >= 0]] = True
    y_td = np.asarray(y).reshape(-1, D)
    assert 0 < routed.sum() <= 4
    assert np.all(y_td[~routed] == 0.0)
    assert np.all(np.abs(y_td[routed]).sum(-1) > 0)
    assert float(aux.stats["dropped_fraction"]) > 0.5


def test_padding_tokens_are_not_routed_and_give_zero():
    block = make_block()
    x = inputs()
    token_mask = jnp.ones((B, S), bool).at[:, -3:].set(False)
    y, _ = call(block, x, token_mask=token_mask)
    assert np.all(np.asarray(y)[:, -3:] == 0.0)
    np.testing.assert_allclose(
        y[:, :-3], reference(_params(block), x, block.spec)[:, :-3], rtol=1e-4, atol=1e-5
    )


def _params(block):
    return nnx.to_pure_dict(nnx.state(block))


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_expert_mask_keeps_tokens_away_from_masked_experts(router):
    block = make_block(router=router)
    x = inputs()
    allowed = jax.random.bernoulli(jax.random.key(4), 0.6, (B, S, E))
    allowed = allowed.at[0, 0].set(jnp.array([False, True, False, False]))  # fewer than k
    allowed = allowed.at[0, 1].set(True)
    allowed = allowed.at[1, 1].set(False)  # no expert at all: the token gets 0
    routing = call(block, x.reshape(-1, D), method="route", expert_mask=allowed.reshape(-1, E))
    slot_token = np.asarray(routing.slot_token)
    flat_allowed = np.asarray(allowed).reshape(-1, E)
    for e, c in zip(*np.nonzero(slot_token >= 0)):
        assert flat_allowed[slot_token[e, c], e], (e, slot_token[e, c])
    assert {0, 1} <= set(slot_token.ravel())  # the restricted tokens are still routed
    assert S + 1 not in set(slot_token.ravel())
    y, _ = call(block, x, expert_mask=allowed)
    np.testing.assert_allclose(
        y, reference(_params(block), x, block.spec, allowed=allowed), rtol=1e-4, atol=1e-5
    )


def test_router_bias_moves_the_routing_not_the_expert_input():
    block = make_block(top_k=1)
    x = inputs()
    bias = 2.0 * jax.random.normal(jax.random.key(5), x.shape)
    y, _ = call(block, x, router_bias=bias)
    want = reference(_params(block), x, block.spec, router_bias=bias)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(y, call(block, x)[0])


def test_bfloat16_experts_close_to_float32_with_the_same_routing():
    x = inputs()
    y32, _ = call(make_block(), x)
    block16 = make_block()
    block16 = MoeBlock(D, F, block16.spec, causal=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(block16, nnx.state(make_block()))
    y16, _ = call(block16, x)
    assert y16.dtype == jnp.float32
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(y16, y32, atol=0.02 * scale)


def test_shared_expert_adds_the_dense_ffn():
    block = make_block(num_shared_experts=1)
    x = inputs()
    y, _ = call(block, x)
    routed = reference(_params(block), x, block.spec)
    np.testing.assert_allclose(y, routed + block.shared(x, train=False), rtol=1e-4, atol=1e-5)


def test_stats_and_losses_come_back():
    block = make_block(capacity_factor_train=1.0)
    _, aux = call(block, inputs(), train=True, seed=0)
    assert aux.aux_loss.shape == () and float(aux.aux_loss) > 0
    assert aux.z_loss.shape == () and float(aux.z_loss) > 0
    assert aux.stats["tokens_per_expert"].shape == (E,)
    assert float(aux.stats["capacity"]) == 8  # ceil(1.0 * 2 * 16 / 4)
    assert 0.0 <= float(aux.stats["dropped_fraction"]) <= 1.0


def test_jitter_randomises_routing_in_training_only():
    block = make_block(top_k=1, jitter=0.5)
    x = inputs()
    y1, _ = call(block, x, train=True, seed=1)
    y2, _ = call(block, x, train=True, seed=2)
    assert not np.allclose(y1, y2)
    np.testing.assert_array_equal(call(block, x)[0], call(block, x)[0])
    with pytest.raises(ValueError, match="rngs"):
        block(x, train=True)


def test_expert_choice_is_refused_in_a_causal_block():
    spec = MoeSpec(num_experts=E, router="expert_choice")
    with pytest.raises(ValueError, match="causal"):
        MoeBlock(D, F, spec, causal=True, rngs=nnx.Rngs(0))


def test_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="router"):
        MoeSpec(num_experts=4, router="sinkhorn")
    with pytest.raises(ValueError, match="num_groups"):
        MoeSpec(num_experts=6, router="hierarchical", num_groups=4)
    with pytest.raises(ValueError, match="top_k"):
        MoeSpec(num_experts=2, top_k=3)


def test_no_tensor_as_large_as_tokens_times_experts_times_capacity():
    # T=64, E=8, k=2, cf=1.25 -> C=20: T*E*C = 10240 elements; every legitimate intermediate
    # ([E, C, d], [E, C, f], [k, T, E], ...) is smaller with d=8, f=16.
    spec = MoeSpec(num_experts=8, top_k=2, capacity_factor_train=1.25)
    block = MoeBlock(8, 16, spec, causal=False, rngs=nnx.Rngs(0))
    graph, state = nnx.split(block)
    x = jnp.zeros((4, 16, 8))

    def loss(state, x):
        y, aux = nnx.merge(graph, state)(x, train=True, rngs=nnx.Rngs(router=0))
        return jnp.sum(y) + aux.aux_loss + aux.z_loss

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x)
    assert spec.capacity(64, train=True) == 20
    assert max(_sizes(jaxpr.jaxpr)) < 64 * 8 * 20


def _sizes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
        for sub in _subjaxprs(eqn):  # pjit, custom_vjp, ... bodies
            yield from _sizes(sub)


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for q in p if isinstance(p, (list, tuple)) else [p]:
            inner = getattr(q, "jaxpr", None)
            if inner is not None:
                yield inner if hasattr(inner, "eqns") else inner.jaxpr
            elif hasattr(q, "eqns"):
                yield q


def test_spec_is_a_frozen_dataclass():
    spec = MoeSpec(num_experts=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.top_k = 3
