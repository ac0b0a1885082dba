"""Noisy top-k gating against Shazeer et al. 2017 eqs. 3-11 written as loops over tokens."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.routing import noisy

_route = jax.jit(noisy.top_k, static_argnames=("k", "capacity", "train"))


def route(clean, std, mask=None, key=None, **kwargs):
    mask = np.ones(len(clean), bool) if mask is None else np.asarray(mask, bool)
    key = jax.random.key(0) if key is None else key
    return _route(jnp.asarray(clean), jnp.asarray(std), key=key, token_mask=mask, **kwargs)


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def cv2(x):
    x = np.asarray(x, np.float64)
    return x.var() / x.mean() ** 2 if x.mean() > 0 else 0.0


def reference(clean, std, noise, k, capacity, train, mask=None):
    """Eqs. 3-5 and 8-11 one token at a time; ``noise`` is the standard normal draw [T, E]."""
    num_tokens, num_experts = clean.shape
    mask = np.ones(num_tokens, bool) if mask is None else mask
    h = clean + noise * std if train else clean.astype(np.float64)
    importance, load = np.zeros(num_experts), np.zeros(num_experts)
    choices = []
    for t in range(num_tokens):
        ranked = sorted(range(num_experts), key=lambda e, t=t: (-h[t, e], e))[:k]
        kept = np.array([h[t, e] for e in ranked], np.float64)
        gates = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()  # softmax of kept
        choices.append(list(zip(ranked, gates)))
        if not mask[t]:
            continue
        for e, g in zip(ranked, gates):
            importance[e] += g
        for i in range(num_experts):
            if train and k < num_experts:  # eq. 9: k-th highest of H excluding i
                kth = sorted(np.delete(h[t], i), reverse=True)[k - 1]
                load[i] += phi((clean[t, i] - kth) / std[t, i])
            else:
                load[i] += i in ranked
    slot_token = -np.ones((num_experts, capacity), np.int64)
    slot_weight = np.zeros((num_experts, capacity))
    count = [0] * num_experts
    for j in range(k):
        for t in np.flatnonzero(mask):
            e, g = choices[t][j]
            if count[e] < capacity:
                slot_token[e, count[e]], slot_weight[e, count[e]] = t, g
            count[e] += 1
    return slot_token, slot_weight, cv2(importance), cv2(load)


def draw(seed, num_tokens, num_experts):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    std = (np.log1p(np.exp(rng.normal(size=(num_tokens, num_experts)))) + 1e-2).astype(np.float32)
    return clean, std


@pytest.mark.parametrize(
    "num_tokens,num_experts,k,capacity,train",
    [(8, 4, 2, 3, True), (8, 4, 2, 3, False), (8, 4, 1, 8, True), (8, 4, 4, 8, True)],
)
def test_matches_loop_reference(num_tokens, num_experts, k, capacity, train):
    clean, std = draw(k * 10 + capacity, num_tokens, num_experts)
    key = jax.random.key(3)
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    r = route(clean, std, mask=mask, key=key, k=k, capacity=capacity, train=train)
    noise = np.asarray(jax.random.normal(key, clean.shape), np.float64)
    want_token, want_weight, imp, load = reference(clean, std, noise, k, capacity, train, mask)
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
    np.testing.assert_allclose(r.stats["importance_cv2"], imp, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r.stats["load_cv2"], load, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r.aux_loss, imp + load, rtol=1e-4, atol=1e-7)


def test_eval_adds_no_noise():
    clean, std = draw(1, 8, 4)
    a = route(clean, std, key=jax.random.key(1), k=2, capacity=3, train=False)
    b = route(clean, std * 100, key=jax.random.key(2), k=2, capacity=3, train=False)
    np.testing.assert_array_equal(a.slot_token, b.slot_token)
    np.testing.assert_array_equal(a.slot_weight, b.slot_weight)


def test_smooth_load_estimator_matches_monte_carlo():
    """P(x, i): fresh noise on element i only, the others' noise fixed (Appendix A, eq. 8)."""
    rng = np.random.default_rng(5)
    k, num_experts, draws = 2, 5, 40000
    clean = rng.normal(size=(3, num_experts)).astype(np.float32)
    std = rng.uniform(0.3, 1.5, size=(3, num_experts)).astype(np.float32)
    h = clean + rng.normal(size=clean.shape).astype(np.float32) * std
    top = -np.sort(-h, axis=1)[:, : k + 1]
    got = np.asarray(noisy.prob_in_top_k(clean, h, std, top, k))
    for t in range(3):
        for i in range(num_experts):
            fresh = clean[t, i] + rng.normal(size=draws) * std[t, i]
            others = np.sort(np.delete(h[t], i))[::-1]
            in_top_k = fresh > others[k - 1]  # beats the k-th best of the rest
            assert abs(in_top_k.mean() - got[t, i]) < 0.015, (t, i, in_top_k.mean(), got[t, i])


def test_gradients_reach_clean_logits_and_noise_std():
    clean, std = draw(6, 8, 4)
    target = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3)), jnp.float32)

    def outputs(clean, std):
        r = route(clean, std, key=jax.random.key(4), k=2, capacity=3, train=True)
        return jnp.stack([jnp.sum(r.slot_weight * target), r.aux_loss])

    d_clean, d_std = jax.jacrev(outputs, argnums=(0, 1))(jnp.asarray(clean), jnp.asarray(std))
    for name, grad in [
        ("slot_weight/clean", d_clean[0]),
        ("aux_loss/clean", d_clean[1]),
        ("slot_weight/std", d_std[0]),  # the kept noisy logits scale with std
        ("aux_loss/std", d_std[1]),  # through the smooth load estimator
    ]:
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4, name


def test_without_noise_load_is_the_true_count():
    clean, std = draw(8, 8, 4)
    r = route(clean, std, k=2, capacity=3, train=False)
    counts = np.zeros(4)
    for row in clean:
        counts[np.argsort(-row, kind="stable")[:2]] += 1
    np.testing.assert_allclose(r.stats["load_cv2"], cv2(counts), rtol=1e-5)


def test_eager_matches_jit_and_train_needs_a_key():
    clean, std = draw(9, 8, 4)
    eager = noisy.top_k(clean, std, k=2, capacity=3, key=None, train=False)
    jitted = route(clean, std, k=2, capacity=3, train=False)
    np.testing.assert_array_equal(eager.slot_token, jitted.slot_token)
    np.testing.assert_allclose(eager.aux_loss, jitted.aux_loss, rtol=1e-6)
    with pytest.raises(ValueError, match="needs a jax.random key"):
        noisy.top_k(clean, std, k=2, capacity=3, key=None, train=True)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    train=st.booleans(),
)
def test_routing_invariants(seed, mask, train):
    clean, std = draw(seed, 8, 4)
    r = route(clean, std, mask=mask, key=jax.random.key(seed), k=2, capacity=3, train=train)
    slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
    filled = slot_token >= 0
    assert np.all(slot_weight >= 0) and np.all(slot_weight[~filled] == 0)
    counts = np.bincount(slot_token[filled], minlength=8)
    assert counts.max(initial=0) <= 2 and np.all(counts[~np.asarray(mask)] == 0)
    # A token's kept gates are part of a softmax over its k kept logits: they sum to <= 1.
    per_token = np.zeros(8)
    np.add.at(per_token, slot_token[filled], slot_weight[filled])
    assert np.all(per_token <= 1 + 1e-6)
    assert np.isfinite(float(r.aux_loss)) and float(r.aux_loss) >= 0
