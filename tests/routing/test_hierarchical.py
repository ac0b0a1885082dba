"""Hierarchical top-k gating against Shazeer et al. 2017 Appendix B written as a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.routing import hierarchical, noisy

STATIC = ("k_primary", "k_secondary", "capacity")
_route = jax.jit(hierarchical.top_k, static_argnames=STATIC)


def route(primary, secondary, mask=None, **kwargs):
    mask = np.ones(len(primary), bool) if mask is None else np.asarray(mask, bool)
    return _route(jnp.asarray(primary), jnp.asarray(secondary), token_mask=mask, **kwargs)


def top_softmax(row, k):
    """KeepTopK then softmax (eq. 3 without noise): [(index, gate)] best first."""
    ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
    kept = np.array([row[i] for i in ranked], np.float64)
    gates = np.exp(kept - kept.max())
    return list(zip(ranked, gates / gates.sum()))


def cv2(x):
    return x.var() / x.mean() ** 2 if x.mean() > 0 else 0.0


def reference(primary, secondary, k_primary, k_secondary, capacity, mask=None):
    num_tokens, num_groups, group_size = secondary.shape
    num_experts = num_groups * group_size
    mask = np.ones(num_tokens, bool) if mask is None else mask
    importance, load = np.zeros(num_experts), np.zeros(num_experts)
    choices = []
    for t in range(num_tokens):
        mine = []  # (gate, primary rank, secondary rank, expert)
        for i, (a, g_a) in enumerate(top_softmax(primary[t], k_primary)):
            for j, (b, g_b) in enumerate(top_softmax(secondary[t, a], k_secondary)):
                mine.append((g_a * g_b, i, j, a * group_size + b))
        mine.sort(key=lambda c: (-c[0], c[1], c[2]))
        choices.append(mine)
        if mask[t]:
            for g, _, _, e in mine:
                importance[e] += g
                load[e] += 1
    slot_token = -np.ones((num_experts, capacity), np.int64)
    slot_weight = np.zeros((num_experts, capacity))
    count = [0] * num_experts
    for j in range(k_primary * k_secondary):
        for t in np.flatnonzero(mask):
            g, _, _, e = choices[t][j]
            if count[e] < capacity:
                slot_token[e, count[e]], slot_weight[e, count[e]] = t, g
            count[e] += 1
    return slot_token, slot_weight, cv2(importance) + cv2(load)


@pytest.mark.parametrize(
    "num_groups,group_size,k_primary,k_secondary,capacity",
    [(3, 4, 2, 2, 2), (3, 4, 1, 2, 8), (2, 3, 2, 1, 3)],
)
def test_matches_loop_reference(num_groups, group_size, k_primary, k_secondary, capacity):
    rng = np.random.default_rng(capacity + k_primary)
    primary = rng.normal(size=(8, num_groups)).astype(np.float32)
    secondary = rng.normal(size=(8, num_groups, group_size)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0], bool)
    r = route(
        primary,
        secondary,
        mask=mask,
        k_primary=k_primary,
        k_secondary=k_secondary,
        capacity=capacity,
    )
    want_token, want_weight, aux = reference(
        primary, secondary, k_primary, k_secondary, capacity, mask
    )
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
    np.testing.assert_allclose(r.aux_loss, aux, rtol=1e-4)


def test_expert_index_is_group_times_group_size_plus_member():
    primary = np.array([[0.0, 9.0, 0.0]], np.float32)  # group 1
    secondary = np.zeros((1, 3, 4), np.float32)
    secondary[0, 1, 2] = 9.0  # member 2 of group 1
    r = route(primary, secondary, k_primary=1, k_secondary=1, capacity=1)
    assert np.asarray(r.slot_token)[1 * 4 + 2, 0] == 0
    assert np.sum(np.asarray(r.slot_token) >= 0) == 1
    np.testing.assert_allclose(np.asarray(r.slot_weight)[6, 0], 1.0)


def test_one_group_is_flat_top_k_gating():
    rng = np.random.default_rng(1)
    secondary = rng.normal(size=(8, 1, 4)).astype(np.float32)
    r = route(np.zeros((8, 1), np.float32), secondary, k_primary=1, k_secondary=2, capacity=3)
    flat = jax.jit(noisy.top_k, static_argnames=("k", "capacity", "train"))(
        secondary[:, 0], np.ones((8, 4), np.float32), k=2, capacity=3, key=None, train=False
    )
    np.testing.assert_array_equal(r.slot_token, flat.slot_token)
    np.testing.assert_allclose(r.slot_weight, flat.slot_weight, rtol=1e-6)
    np.testing.assert_allclose(r.aux_loss, flat.aux_loss, rtol=1e-5)


def test_gradients_reach_both_levels():
    rng = np.random.default_rng(2)
    primary = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    secondary = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)

    def outputs(p, s):
        r = route(p, s, k_primary=2, k_secondary=2, capacity=2)
        return jnp.stack([jnp.sum(r.slot_weight * target), r.aux_loss, r.z_loss])

    d_primary, d_secondary = jax.jacrev(outputs, argnums=(0, 1))(primary, secondary)
    for level, grads in [("primary", d_primary), ("secondary", d_secondary)]:
        for name, grad in zip(["slot_weight", "aux_loss", "z_loss"], grads):
            assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4, (level, name)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="must start with"):
        hierarchical.top_k(
            np.zeros((8, 3)), np.zeros((8, 2, 4)), k_primary=1, k_secondary=1, capacity=2
        )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_routing_invariants(seed, mask):
    rng = np.random.default_rng(seed)
    primary = rng.normal(size=(8, 3)).astype(np.float32)
    secondary = rng.normal(size=(8, 3, 4)).astype(np.float32)
    r = route(primary, secondary, mask=mask, k_primary=1, k_secondary=2, capacity=8)
    slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
    filled = slot_token >= 0
    counts = np.bincount(slot_token[filled], minlength=8)
    # Capacity = T drops nothing: each real token gets exactly k_p * k_s = 2 experts in one group,
    # with gates that sum to 1.
    np.testing.assert_array_equal(counts, np.where(mask, 2, 0))
    per_token = np.zeros(8)
    np.add.at(per_token, slot_token[filled], slot_weight[filled])
    np.testing.assert_allclose(per_token, np.where(mask, 1.0, 0.0), atol=1e-6)
    for t in np.flatnonzero(mask):
        groups = {e // 4 for e in np.nonzero(slot_token == t)[0]}
        assert groups == {int(np.argmax(primary[t]))}
