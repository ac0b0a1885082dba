"""Sigmoid gates, the selection bias, device-limited routing and the bias update, against loops
written from the papers (DeepSeek-V2 §2.1.3, DeepSeek-V3 §2.1.2, Wang et al. 2024 Algorithm 1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.routing import balance, token_choice

STATIC = ("k", "capacity", "score", "device_limit", "num_devices", "routed_scaling", "renormalize")
_route = jax.jit(token_choice.top_k, static_argnames=STATIC)


def route(logits, bias=None, mask=None, **kwargs):
    mask = np.ones(len(logits), bool) if mask is None else np.asarray(mask, bool)
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)
    return _route(jnp.asarray(logits), bias=bias, token_mask=jnp.asarray(mask), **kwargs)


def reference(
    logits,
    *,
    k,
    capacity,
    score="softmax",
    bias=None,
    device_limit=0,
    num_devices=1,
    routed_scaling=1.0,
    renormalize=True,
    mask=None,
):
    """One token at a time: scores, the M best devices by their best ``s + b``, the top-k of
    ``s + b`` among those devices' experts, gates ``s_i / sum s_j`` times the scaling factor; then
    GShard's slot filling (all first choices, then all second choices).

    Returns slot_token [E, C], slot_weight [E, C], choices [T][k], normalised scores [T][E].
    """
    num_tokens, num_experts = logits.shape
    mask = np.ones(num_tokens, bool) if mask is None else np.asarray(mask, bool)
    bias = np.zeros(num_experts) if bias is None else np.asarray(bias, np.float64)
    per_device = num_experts // num_devices
    choices, gates, normalised = [], [], []
    for t in range(num_tokens):
        x = np.asarray(logits[t], np.float64)
        if score == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in x]
        else:
            z = [math.exp(v - max(x)) for v in x]
            s = [v / sum(z) for v in z]
        normalised.append([v / sum(s) for v in s])
        sel = [s[e] + bias[e] for e in range(num_experts)]
        devices = list(range(num_devices))
        if 0 < device_limit < num_devices:
            best = {j: max(sel[j * per_device : (j + 1) * per_device]) for j in devices}
            devices = sorted(devices, key=lambda j, b=best: (-b[j], j))[:device_limit]
        candidates = [e for e in range(num_experts) if e // per_device in devices]
        chosen = sorted(candidates, key=lambda e, v=sel: (-v[e], e))[:k]
        top = [s[e] for e in chosen]
        g = [v / sum(top) for v in top] if renormalize else top
        choices.append(chosen)
        gates.append([v * routed_scaling for v in g])
    slot_token = -np.ones((num_experts, capacity), np.int64)
    slot_weight = np.zeros((num_experts, capacity))
    count = [0] * num_experts
    for j in range(k):
        for t in range(num_tokens):
            if not mask[t]:
                continue
            e = choices[t][j]
            if count[e] < capacity:
                slot_token[e, count[e]] = t
                slot_weight[e, count[e]] = gates[t][j]
            count[e] += 1
    return slot_token, slot_weight, choices, np.asarray(normalised)


def reference_stats(choices, normalised, mask, num_experts, num_devices):
    """Balance loss ``E sum f_i P_i`` (DeepSeek-V3 eqs. 17-20 over the group), the selected
    choices per expert and the mean device fan-out."""
    counts = np.zeros(num_experts)
    fanout = []
    for t in np.flatnonzero(mask):
        for e in choices[t]:
            counts[e] += 1
        fanout.append(len({e // (num_experts // num_devices) for e in choices[t]}))
    p_mean = normalised[mask].mean(0)
    aux = num_experts * np.sum(counts / counts.sum() * p_mean)
    return aux, counts, np.mean(fanout)


CASES = [  # T, E, k, C, score, with bias, device_limit, num_devices, routed_scaling, renormalize
    (16, 8, 2, 4, "sigmoid", False, 0, 1, 1.0, True),
    (16, 8, 2, 3, "sigmoid", True, 0, 1, 2.5, True),
    (16, 8, 3, 16, "sigmoid", True, 2, 4, 1.0, True),
    (16, 8, 2, 4, "sigmoid", False, 1, 4, 1.0, False),
    (16, 8, 2, 4, "softmax", True, 0, 1, 1.0, True),
    (16, 8, 2, 3, "softmax", True, 1, 2, 1.0, False),
    (12, 12, 4, 5, "sigmoid", True, 2, 3, 1.5, True),
]


@pytest.mark.parametrize("T,E,k,C,score,with_bias,limit,D,scaling,renormalize", CASES)
def test_matches_the_deepseek_routing_loop(
    T, E, k, C, score, with_bias, limit, D, scaling, renormalize
):
    rng = np.random.default_rng(T * E + k + C + limit)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = (0.3 * rng.normal(size=E)).astype(np.float32) if with_bias else None
    mask = rng.random(T) > 0.2
    kw = dict(k=k, capacity=C, score=score, device_limit=limit, num_devices=D)
    kw.update(routed_scaling=scaling, renormalize=renormalize)
    r = route(logits, bias, mask, **kw)
    want_token, want_weight, choices, normalised = reference(logits, bias=bias, mask=mask, **kw)
    np.testing.assert_array_equal(r.slot_token, want_token)
    np.testing.assert_allclose(r.slot_weight, want_weight, rtol=1e-5, atol=1e-6)
    aux, counts, fanout = reference_stats(choices, normalised, mask, E, D)
    np.testing.assert_allclose(r.aux_loss, aux, rtol=1e-5)
    np.testing.assert_array_equal(r.stats["choices_per_expert"], counts)
    np.testing.assert_allclose(r.stats["device_fanout"], fanout, rtol=1e-6)
    np.testing.assert_allclose(r.stats["expert_fraction"], counts / counts.sum(), atol=1e-6)


def test_sigmoid_gates_are_renormalised_scores_times_the_scaling_factor():
    logits = np.array([[2.0, 0.0, -1.0, 1.0]], np.float32)
    r = route(logits, k=2, capacity=1, score="sigmoid", routed_scaling=2.5)
    s = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    assert r.slot_token[0, 0] == 0 and r.slot_token[3, 0] == 0
    np.testing.assert_allclose(r.slot_weight[0, 0], 2.5 * s[0] / (s[0] + s[3]), rtol=1e-6)
    np.testing.assert_allclose(r.slot_weight[3, 0], 2.5 * s[3] / (s[0] + s[3]), rtol=1e-6)


def test_bias_selects_but_is_not_in_the_gate():
    logits = np.array([[2.0, 0.0, -1.0, 1.0]], np.float32)
    bias = np.array([0.0, 0.0, 5.0, 0.0], np.float32)  # pulls expert 2 into the top 2
    r = route(logits, bias, k=2, capacity=1, score="sigmoid")
    s = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    assert r.slot_token[2, 0] == 0 and r.slot_token[0, 0] == 0 and r.slot_token[3, 0] == -1
    np.testing.assert_allclose(r.slot_weight[2, 0], s[2] / (s[0] + s[2]), rtol=1e-6)


def test_no_gradient_flows_into_the_bias():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)

    def total(bias):
        r = token_choice.top_k(logits, k=2, capacity=8, score="sigmoid", bias=bias)
        return jnp.sum(r.slot_weight) + r.aux_loss + r.z_loss

    np.testing.assert_array_equal(jax.grad(total)(jnp.zeros(4)), 0.0)


def test_device_limit_keeps_the_devices_with_the_best_single_expert():
    # 4 devices of 2 experts. Device 1 has the best expert (0.9); device 3 the best pair
    # (0.8 + 0.8), which a sum-of-scores rule would keep instead; device 0 is third.
    probs = np.array([[0.5, 0.1, 0.9, 0.0, 0.0, 0.0, 0.8, 0.8]])
    logits = np.log(np.maximum(probs, 1e-9) / (1 - np.minimum(probs, 1 - 1e-9))).astype(np.float32)
    r = route(logits, k=2, capacity=1, score="sigmoid", device_limit=2, num_devices=4)
    chosen = sorted(np.flatnonzero(np.asarray(r.slot_token)[:, 0] >= 0).tolist())
    assert chosen == [2, 6]  # expert 2 (device 1) and expert 6 (device 3, best of the rest)
    r = route(logits, k=2, capacity=1, score="sigmoid", device_limit=1, num_devices=4)
    assert sorted(np.flatnonzero(np.asarray(r.slot_token)[:, 0] >= 0).tolist()) == [2, 3]
    assert float(r.stats["device_fanout"]) == 1.0


def test_device_limit_bounds_every_tokens_fanout():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    for limit in (1, 2, 3):
        k = 4 if limit == 1 else 6
        r = route(logits, k=k, capacity=64, score="sigmoid", device_limit=limit, num_devices=4)
        slot_token = np.asarray(r.slot_token)
        devices = [set() for _ in range(64)]
        for e, row in enumerate(slot_token):
            for t in row[row >= 0]:
                devices[t].add(e // 4)
        assert max(len(d) for d in devices) <= limit
        np.testing.assert_allclose(r.stats["device_fanout"], np.mean([len(d) for d in devices]))
    unlimited = route(logits, k=6, capacity=64, score="sigmoid", num_devices=4)
    assert float(unlimited.stats["device_fanout"]) > 3.0


def test_device_ties_go_to_the_lower_device():
    logits = np.zeros((1, 8), np.float32)  # every expert scores the same
    r = route(logits, k=2, capacity=1, score="sigmoid", device_limit=1, num_devices=4)
    assert np.flatnonzero(np.asarray(r.slot_token)[:, 0] >= 0).tolist() == [0, 1]


def test_softmax_without_bias_or_limit_is_unchanged():
    logits = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
    plain = route(logits, k=2, capacity=4)
    zero_bias = route(logits, np.zeros(8), k=2, capacity=4, num_devices=4)
    np.testing.assert_array_equal(plain.slot_token, zero_bias.slot_token)
    np.testing.assert_array_equal(plain.slot_weight, zero_bias.slot_weight)
    assert float(plain.stats["device_fanout"]) == 1.0


def test_bad_deepseek_arguments_raise_clear_errors():
    logits = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="score='tanh'"):
        token_choice.top_k(logits, k=2, capacity=2, score="tanh")
    with pytest.raises(ValueError, match="num_devices=3"):
        token_choice.top_k(logits, k=2, capacity=2, num_devices=3)
    with pytest.raises(ValueError, match="fewer than k=3"):
        token_choice.top_k(logits, k=3, capacity=2, device_limit=1, num_devices=4)
    with pytest.raises(ValueError, match="bias has shape"):
        token_choice.top_k(logits, k=2, capacity=2, bias=jnp.zeros(4))


def bias_update_loop(bias, load, rate):
    """Wang et al. 2024 Algorithm 1: e_i = mean(c) - c_i; b_i += u * sign(e_i)."""
    mean = sum(load) / len(load)
    out = []
    for b, c in zip(bias, load):
        e = mean - c
        out.append(b + rate * (1.0 if e > 0 else -1.0 if e < 0 else 0.0))
    return np.asarray(out, np.float32)


def test_bias_update_lowers_overloaded_and_raises_underloaded_experts():
    bias = np.array([0.1, 0.0, -0.2, 0.0], np.float32)
    load = np.array([10.0, 2.0, 4.0, 4.0], np.float32)  # mean 5
    got = balance.bias_update(jnp.asarray(bias), jnp.asarray(load), 1e-3)
    np.testing.assert_allclose(got, [0.1 - 1e-3, 1e-3, -0.2 + 1e-3, 1e-3], rtol=1e-6)
    assert got.dtype == jnp.float32
    rng = np.random.default_rng(4)
    for _ in range(20):
        bias = rng.normal(size=8).astype(np.float32)
        load = rng.integers(0, 5, size=8).astype(np.float32)  # ties with the mean happen
        want = bias_update_loop(bias, load, 0.01)
        np.testing.assert_allclose(balance.bias_update(bias, load, 0.01), want, rtol=1e-6)
        scaled = balance.bias_update(bias, load / 8, 0.01)  # a mean over 8 groups: same update
        np.testing.assert_array_equal(scaled, balance.bias_update(bias, load, 0.01))


def test_balanced_load_leaves_the_bias_unchanged():
    bias = jnp.asarray([0.3, -0.1, 0.0])
    np.testing.assert_array_equal(balance.bias_update(bias, jnp.full(3, 7.0), 1e-3), bias)
    np.testing.assert_array_equal(
        balance.bias_update(bias, jnp.asarray([9.0, 1.0, 0.0]), 0.0), bias
    )


def test_the_bias_update_balances_a_skewed_router():
    # Fixed logits that favour the low experts; repeated updates from each round's selection
    # spread the choices (the loss-free controller, no gradients).
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(256, 8)) - np.linspace(0, 2, 8)).astype(np.float32)
    bias = jnp.zeros(8)
    first = None
    for _ in range(300):
        r = route(logits, bias, k=2, capacity=256, score="sigmoid")
        load = r.stats["choices_per_expert"]
        first = load if first is None else first
        bias = balance.bias_update(bias, load, 1e-2)
    cv = lambda x: float(np.std(x) / np.mean(x))  # noqa: E731
    assert cv(load) < 0.25 * cv(first), (cv(first), cv(load))
