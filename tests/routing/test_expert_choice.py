"""Expert-choice routing against a loop over experts (Zhou et al. 2022)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.routing import expert_choice

_route = jax.jit(expert_choice.route, static_argnames=("capacity",))


def route(logits, mask=None, **kwargs):
    mask = np.ones(len(logits), bool) if mask is None else np.asarray(mask, bool)
    return _route(jnp.asarray(logits), token_mask=jnp.asarray(mask), **kwargs)


def reference(logits, capacity, mask=None):
    """Each expert, in turn, takes its best ``capacity`` real tokens (ties: lower token first)."""
    num_tokens, num_experts = logits.shape
    mask = np.ones(num_tokens, bool) if mask is None else np.asarray(mask, bool)
    probs = []
    for row in logits.astype(np.float64):
        e = np.exp(row - row.max())
        probs.append(e / e.sum())
    slot_token = -np.ones((num_experts, capacity), np.int64)
    slot_weight = np.zeros((num_experts, capacity))
    for e in range(num_experts):
        real = [t for t in range(num_tokens) if mask[t]]
        best = sorted(real, key=lambda t, e=e: (-probs[t][e], t))[:capacity]
        for c, t in enumerate(best):
            slot_token[e, c], slot_weight[e, c] = t, probs[t][e]
    picks = [int(np.sum(slot_token == t)) for t in range(num_tokens)]
    real = np.flatnonzero(mask)
    unpicked = np.mean([picks[t] == 0 for t in real])
    z = np.mean([math.log(np.exp(logits[t].astype(np.float64)).sum()) ** 2 for t in real])
    return slot_token, slot_weight, unpicked, np.mean([picks[t] for t in real]), z


@pytest.mark.parametrize("num_tokens,num_experts,capacity", [(8, 4, 2), (8, 4, 8), (12, 3, 5)])
def test_matches_loop_over_experts(num_tokens, num_experts, capacity):
    rng = np.random.default_rng(capacity)
    for logits in (
        rng.normal(size=(num_tokens, num_experts)).astype(np.float32),
        # Repeated rows: exact ties between tokens (within a row, rounding could split them).
        rng.normal(size=(3, num_experts)).astype(np.float32)[rng.integers(0, 3, num_tokens)],
    ):
        r = route(logits, capacity=capacity)
        want_token, want_weight, unpicked, per_token, z = reference(logits, capacity)
        np.testing.assert_array_equal(r.slot_token, want_token)
        np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
        np.testing.assert_allclose(r.stats["unpicked_fraction"], unpicked, atol=1e-6)
        np.testing.assert_allclose(r.stats["experts_per_token"], per_token, rtol=1e-6)
        np.testing.assert_allclose(r.z_loss, z, rtol=1e-5)
        assert float(r.aux_loss) == 0.0


def test_padding_is_never_picked_and_leaves_slots_empty():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)  # 5 real tokens, capacity 8
    r = route(logits, mask=mask, capacity=8)
    want_token, want_weight, unpicked, per_token, z = reference(logits, 8, mask)
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, atol=1e-6)
    assert np.all(np.asarray(r.slot_token)[:, 5:] == -1)
    np.testing.assert_allclose(r.stats["experts_per_token"], 4.0)  # every expert takes all 5
    np.testing.assert_allclose([r.stats["unpicked_fraction"], r.z_loss], [0.0, z], rtol=1e-5)


def test_expert_load_is_balanced_by_construction():
    logits = 4.0 * np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    r = route(logits, capacity=2)
    np.testing.assert_array_equal(r.stats["tokens_per_expert"], 2.0)
    np.testing.assert_allclose(r.stats["expert_load"], 0.25)


def test_gradients_reach_logits_through_weights_and_z_loss():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(4).normal(size=(4, 2)), jnp.float32)

    def outputs(x):
        r = route(x, capacity=2)
        return jnp.stack([jnp.sum(r.slot_weight * target), r.z_loss])

    for name, grad in zip(["slot_weight", "z_loss"], jax.jacrev(outputs)(logits)):
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-4, name


def test_eager_matches_jit():
    logits = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)
    eager = expert_choice.route(logits, capacity=2)
    jitted = route(logits, capacity=2)
    np.testing.assert_array_equal(eager.slot_token, jitted.slot_token)
    np.testing.assert_allclose(eager.slot_weight, jitted.slot_weight, rtol=1e-6)


def test_causal_decoder_is_refused_with_a_clear_message():
    with pytest.raises(ValueError) as err:
        expert_choice.check_allowed(True, "decoder layer 3")
    assert str(err.value) == (
        "expert choice routing looks at future tokens; it cannot be used in a causal decoder "
        "(decoder layer 3)"
    )
    expert_choice.check_allowed(False, "encoder layer 1")  # allowed: no error


def test_capacity_beyond_tokens_is_an_error():
    with pytest.raises(ValueError, match="capacity=9"):
        expert_choice.route(np.zeros((8, 4), np.float32), capacity=9)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=32, max_size=32),
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    capacity=st.sampled_from([2, 8]),
)
def test_routing_invariants(values, mask, capacity):
    logits = np.asarray(values, np.float32).reshape(8, 4) * 0.7
    mask = np.asarray(mask, bool)
    r = route(logits, mask=mask, capacity=capacity)
    slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
    filled = slot_token >= 0
    # Every expert fills min(C, real tokens) slots, from the front, with distinct real tokens.
    np.testing.assert_array_equal(filled.sum(1), min(capacity, mask.sum()))
    assert np.all(filled[:, :-1] >= filled[:, 1:])
    assert np.all(mask[slot_token[filled]])
    for e in range(4):
        assert len(set(slot_token[e][filled[e]])) == filled[e].sum()
    # Weights are the tokens' probabilities for that expert, in non-increasing order.
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    expected = np.where(filled, probs[np.maximum(slot_token, 0), np.arange(4)[:, None]], 0.0)
    np.testing.assert_allclose(slot_weight, expected, rtol=1e-6)
    assert np.all(np.diff(slot_weight, axis=1)[filled[:, 1:]] <= 1e-7)
