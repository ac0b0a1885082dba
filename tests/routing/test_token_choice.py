"""Softmax top-k routing against GShard Algorithm 1 written as a loop over tokens."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.routing import token_choice

STATIC = ("k", "capacity", "renormalize", "second_expert_policy", "second_expert_threshold")
_route = jax.jit(token_choice.top_k, static_argnames=(*STATIC, "batch_priority"))


def route(logits, mask=None, key=None, **kwargs):
    """Jitted router; always passes a mask and a key so that tests share compilations."""
    mask = np.ones(len(logits), bool) if mask is None else np.asarray(mask, bool)
    key = jax.random.key(0) if key is None else key
    return _route(jnp.asarray(logits), token_mask=jnp.asarray(mask), key=key, **kwargs)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def reference(
    logits,
    k,
    capacity,
    renormalize=True,
    mask=None,
    batch_priority=False,
    uniform=None,
    threshold=0.2,
):
    """GShard Algorithm 1, generalised to k choices, one token at a time.

    ``uniform`` [T, k] are the random policy's draws (None: policy "all").
    Returns slot_token [E, C], slot_weight [E, C], choices {(t, e): gate} selected pre-capacity.
    """
    num_tokens, num_experts = logits.shape
    mask = np.ones(num_tokens, bool) if mask is None else np.asarray(mask, bool)
    probs = [softmax(row) for row in logits]
    ranked = [sorted(range(num_experts), key=lambda e, p=p: (-p[e], e))[:k] for p in probs]
    order = list(range(num_tokens))
    if batch_priority:
        order = sorted(order, key=lambda t: -probs[t][ranked[t][0]])
    slot_token = -np.ones((num_experts, capacity), np.int64)
    slot_weight = np.zeros((num_experts, capacity))
    count = [0] * num_experts
    for j in range(k):  # all first choices, then all second choices, ...
        for t in order:
            if not mask[t]:
                continue
            top = [probs[t][e] for e in ranked[t]]
            renormed = [g / sum(top) for g in top]
            gate = renormed[j] if renormalize else top[j]
            if uniform is not None and j > 0 and not uniform[t, j] < renormed[j] / threshold:
                continue
            e = ranked[t][j]
            if count[e] < capacity:
                slot_token[e, count[e]] = t
                slot_weight[e, count[e]] = gate
            count[e] += 1
    return slot_token, slot_weight, ranked, probs


def reference_losses(logits, k, mask=None):
    num_tokens, num_experts = logits.shape
    mask = np.ones(num_tokens, bool) if mask is None else np.asarray(mask, bool)
    _, _, ranked, probs = reference(logits, k, 1, mask=mask)
    f, p_mean, z = np.zeros(num_experts), np.zeros(num_experts), 0.0
    for t in np.flatnonzero(mask):
        for e in ranked[t]:
            f[e] += 1
        p_mean += probs[t]
        z += math.log(sum(math.exp(v) for v in logits[t])) ** 2
    n = mask.sum()
    return num_experts * np.sum(f / f.sum() * p_mean / n), z / n, f / f.sum()


CASES = [  # T, E, k, C, renormalize
    (8, 4, 1, 2, False),  # Switch top-1
    (8, 4, 2, 3, True),  # GShard top-2, some drops
    (8, 4, 2, 8, True),  # full capacity: nothing dropped
    (8, 4, 3, 2, True),
    (8, 4, 2, 1, False),
    (12, 6, 2, 3, True),
]


@pytest.mark.parametrize("num_tokens,num_experts,k,capacity,renormalize", CASES)
def test_matches_gshard_algorithm_1_loop(num_tokens, num_experts, k, capacity, renormalize):
    rng = np.random.default_rng(num_tokens * 100 + k * 10 + capacity)
    for logits in (
        rng.normal(size=(num_tokens, num_experts)).astype(np.float32),
        rng.integers(-1, 2, size=(num_tokens, num_experts)).astype(np.float32),
    ):  # ties
        r = route(logits, k=k, capacity=capacity, renormalize=renormalize)
        want_token, want_weight, _, _ = reference(logits, k, capacity, renormalize)
        np.testing.assert_array_equal(r.slot_token, want_token)
        np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
        aux, z, f = reference_losses(logits, k)
        np.testing.assert_allclose(r.aux_loss, aux, rtol=1e-5)
        np.testing.assert_allclose(r.z_loss, z, rtol=1e-5)
        np.testing.assert_allclose(r.stats["expert_fraction"], f, atol=1e-6)


def test_top2_fills_first_choices_before_second():
    # Token 0: first choice expert 1, second expert 0. Token 1: first choice expert 0.
    logits = np.log(np.array([[0.3, 0.6, 0.1], [0.7, 0.2, 0.1]], np.float32))
    r = route(logits, k=2, capacity=1)
    assert r.slot_token[0, 0] == 1  # token 1's first choice beats token 0's earlier second choice
    assert r.slot_token[1, 0] == 0
    np.testing.assert_allclose(r.stats["dropped_fraction"], 0.5)  # both second choices dropped


def test_full_capacity_keeps_every_choice():
    logits = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    r = route(logits, k=2, capacity=8)
    assert float(r.stats["dropped_fraction"]) == 0.0
    counts = np.bincount(np.asarray(r.slot_token)[np.asarray(r.slot_token) >= 0], minlength=8)
    np.testing.assert_array_equal(counts, 2)
    np.testing.assert_allclose(np.asarray(r.stats["tokens_per_expert"]).sum(), 16)


def test_batch_priority_fills_by_descending_top1_probability():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 4)).astype(np.float32) * 2
    r = route(logits, k=2, capacity=3, batch_priority=True)
    want_token, want_weight, _, _ = reference(logits, 2, 3, batch_priority=True)
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
    # Two tokens want expert 0 and there is one slot: the confident later token wins it.
    logits = np.array([[1.0, 0.0], [5.0, 0.0]], np.float32)
    assert route(logits, k=1, capacity=1, batch_priority=True).slot_token[0, 0] == 1
    assert route(logits, k=1, capacity=1).slot_token[0, 0] == 0


def test_padding_is_never_routed_and_not_counted():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)
    r = route(logits, mask=mask, k=2, capacity=3)
    want_token, _, _, _ = reference(logits, 2, 3, mask=mask)
    np.testing.assert_array_equal(r.slot_token, want_token)
    assert not np.isin(np.asarray(r.slot_token), np.flatnonzero(~mask)).any()
    aux, z, f = reference_losses(logits, 2, mask=mask)
    np.testing.assert_allclose([r.aux_loss, r.z_loss], [aux, z], rtol=1e-5)
    np.testing.assert_allclose(r.stats["expert_fraction"], f, atol=1e-6)
    probs = np.stack([softmax(row) for row in logits[mask]])
    np.testing.assert_allclose(r.stats["router_confidence"], probs.max(-1).mean(), rtol=1e-5)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    np.testing.assert_allclose(r.stats["router_entropy"], entropy, rtol=1e-5)
    # Padding at the end routes exactly like the real tokens alone.
    mask = np.array([1] * 5 + [0] * 3, bool)
    padded = route(logits, mask=mask, k=2, capacity=3)
    alone = route(logits[:5], k=2, capacity=3)
    np.testing.assert_array_equal(padded.slot_token, alone.slot_token)
    np.testing.assert_allclose(padded.aux_loss, alone.aux_loss, rtol=1e-6)


def test_random_policy_matches_loop_with_the_same_draws():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    key = jax.random.key(7)
    r = route(logits, key=key, k=2, capacity=8, second_expert_policy="random")
    uniform = np.asarray(jax.random.uniform(key, (8, 2)))
    want_token, want_weight, _, _ = reference(logits, 2, 8, uniform=uniform)
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_random_policy_keeps_second_expert_with_probability_min_1_g_over_threshold(threshold):
    num_tokens = 4000
    # Half the tokens have renormalised g2 = 0.1, half g2 = 0.3.
    g2 = np.where(np.arange(num_tokens) % 2 == 0, 0.1, 0.3)
    logits = np.log(np.stack([1 - g2, g2], axis=1)).astype(np.float32)
    r = route(
        logits,
        key=jax.random.key(11),
        k=2,
        capacity=num_tokens,
        second_expert_policy="random",
        second_expert_threshold=threshold,
    )
    second = np.zeros(num_tokens, bool)
    second[np.asarray(r.slot_token[1])[np.asarray(r.slot_token[1]) >= 0]] = True
    for g in (0.1, 0.3):
        rate = second[np.isclose(g2, g)].mean()
        assert abs(rate - min(1.0, g / threshold)) < 0.04, (g, rate)
    assert np.all(np.asarray(r.slot_token[0]) == np.arange(num_tokens))  # first choices all kept


def test_switch_top1_keeps_raw_probability():
    logits = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)
    r = route(logits, k=1, capacity=2, renormalize=False)
    probs = np.stack([softmax(row) for row in logits])
    filled = np.asarray(r.slot_token) >= 0
    tokens = np.asarray(r.slot_token)[filled]
    np.testing.assert_allclose(np.asarray(r.slot_weight)[filled], probs[tokens].max(-1), rtol=1e-5)


def test_balance_loss_is_one_at_perfect_balance():
    # Every token picks a different expert: f uniform.
    logits = 5.0 * np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
    r = route(logits, k=1, capacity=2, renormalize=False)
    np.testing.assert_allclose(r.aux_loss, 1.0, rtol=1e-6)
    # Uniform probabilities: P uniform, whatever the (tie-broken) choices.
    np.testing.assert_allclose(route(np.zeros((8, 4), np.float32), k=2, capacity=3).aux_loss, 1.0)


def test_bfloat16_logits_route_in_float32():
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(8, 4)), jnp.bfloat16)
    r = route(logits, k=2, capacity=3)
    want = route(logits.astype(jnp.float32), k=2, capacity=3)
    assert r.slot_weight.dtype == jnp.float32 and r.aux_loss.dtype == jnp.float32
    np.testing.assert_array_equal(r.slot_token, want.slot_token)
    np.testing.assert_allclose(r.slot_weight, want.slot_weight, rtol=1e-6)


def test_gradients_reach_logits_through_weights_and_losses():
    logits = jnp.asarray(np.random.default_rng(8).normal(size=(8, 4)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)), jnp.float32)

    def outputs(x):
        r = route(x, k=2, capacity=3)
        return jnp.stack([jnp.sum(r.slot_weight * target), r.aux_loss, r.z_loss])

    grads = jax.jacrev(outputs)(logits)  # [3, T, E]
    for name, grad in zip(["slot_weight", "aux_loss", "z_loss"], grads):
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4, name


def test_eager_matches_jit():
    logits = np.random.default_rng(10).normal(size=(8, 4)).astype(np.float32)
    eager = token_choice.top_k(logits, k=2, capacity=3)
    jitted = route(logits, k=2, capacity=3)
    np.testing.assert_array_equal(eager.slot_token, jitted.slot_token)
    np.testing.assert_allclose(eager.slot_weight, jitted.slot_weight, rtol=1e-6)
    np.testing.assert_allclose(eager.aux_loss, jitted.aux_loss, rtol=1e-6)


@pytest.mark.parametrize(
    "args,want",
    [
        ((8, 4, 2, 1.0), 4),
        ((8, 4, 2, 1.25), 5),
        ((20, 4, 2, 1.1), 11),  # 1.1 * 2 * 20 / 4 = 11.000000000000002 in floats
        ((3, 8, 1, 1.0), 1),  # at least one slot
        ((8, 2, 2, 2.0), 8),  # at most T slots
        ((8, 4, 2, 0.0), 8),  # dropless
        ((8, 4, 2, -1.0), 8),
    ],
)
def test_capacity_rule(args, want):
    assert token_choice.capacity(*args) == want


def test_bad_arguments_raise_clear_errors():
    logits = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="k=4"):
        token_choice.top_k(logits, k=4, capacity=2)
    with pytest.raises(ValueError, match="needs a jax.random key"):
        token_choice.top_k(logits, k=2, capacity=2, second_expert_policy="random")
    with pytest.raises(ValueError, match="second_expert_policy"):
        token_choice.top_k(logits, k=2, capacity=2, second_expert_policy="sampling")
    with pytest.raises(ValueError, match="num_tokens"):
        token_choice.capacity(0, 4, 2, 1.0)


CONFIGS = [(1, 2, False), (2, 3, True), (2, 8, True), (3, 2, True), (2, 1, False)]  # from CASES


@settings(max_examples=60, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    values=st.lists(st.integers(-3, 3), min_size=32, max_size=32),
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    scale=st.sampled_from([0.3, 1.0, 4.0]),
)
def test_routing_invariants(config, values, mask, scale):
    k, capacity, renormalize = config
    logits = np.asarray(values, np.float32).reshape(8, 4) * scale
    r = route(logits, mask=mask, k=k, capacity=capacity, renormalize=renormalize)
    slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
    filled = slot_token >= 0
    # Slots fill from the front; empty slots weigh nothing; weights are non-negative.
    assert np.all(filled[:, :-1] >= filled[:, 1:])
    assert np.all(slot_weight[~filled] == 0) and np.all(slot_weight >= 0)
    # Each token sits in at most k slots, never twice in one expert, never if padding.
    counts = np.bincount(slot_token[filled], minlength=8)
    assert counts.max(initial=0) <= k
    assert np.all(counts[~np.asarray(mask)] == 0)
    for e in range(4):
        assert len(set(slot_token[e][filled[e]])) == filled[e].sum()
    # Kept weights are the token's gates for that expert, among its top k.
    probs = np.stack([softmax(row) for row in logits])
    for e, c in zip(*np.nonzero(filled)):
        t = slot_token[e, c]
        top = np.sort(probs[t])[::-1][:k]
        assert probs[t, e] >= top[-1] - 1e-6
        want = probs[t, e] / top.sum() if renormalize else probs[t, e]
        np.testing.assert_allclose(slot_weight[e, c], want, rtol=1e-5)
    # An expert is short of capacity only if fewer choices asked for it.
    f = np.asarray(r.stats["expert_fraction"]) * k * np.sum(mask)
    np.testing.assert_allclose(filled.sum(1), np.minimum(np.round(f), capacity))


def test_blocked_softmax_is_the_softmax_and_keeps_a_masked_parent_bit_identical():
    """``softmax(logits, blocks)`` sums its normaliser block by block (a grown model's parent
    experts, then each growth's): it is the softmax, and with the added experts masked
    (exact zero exponentials) the first block's probabilities are the parent's, bit for bit."""
    rng = np.random.default_rng(3)
    for num_tokens in (7, 64, 300):
        parent = jnp.asarray(rng.normal(size=(num_tokens, 64)) * 3, jnp.float32)
        want = np.asarray(jax.jit(lambda x: jax.nn.softmax(x, axis=-1))(parent))
        for blocks in ((64, 8), (64, 8, 8), (64, 8, 8, 8)):
            free = jnp.asarray(rng.normal(size=(num_tokens, sum(blocks))), jnp.float32)
            got = jax.jit(token_choice.softmax, static_argnums=1)(free, blocks)
            np.testing.assert_allclose(got, jax.nn.softmax(free, axis=-1), rtol=1e-6, atol=1e-7)
            masked = jnp.full((num_tokens, sum(blocks) - 64), -1e9, jnp.float32)
            grown = jnp.concatenate([parent, masked], axis=-1)
            got = np.asarray(jax.jit(token_choice.softmax, static_argnums=1)(grown, blocks))
            assert np.array_equal(got[:, :64].view(np.uint32), want.view(np.uint32))
            assert not got[:, 64:].any()
    with pytest.raises(ValueError, match="sum to 10"):
        token_choice.softmax(jnp.zeros((2, 10)), (8, 4))
