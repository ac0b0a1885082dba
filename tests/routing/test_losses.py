"""Router losses against hand-computed values and uniform routing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.routing import losses


def test_cv_squared_is_zero_for_equal_loads():
    assert float(losses.cv_squared(jnp.full((8,), 3.5))) == 0.0


def test_cv_squared_matches_hand_value_with_population_variance():
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5, cv^2 = 3.5 / 9.
    np.testing.assert_allclose(losses.cv_squared(jnp.array([1.0, 2.0, 3.0, 6.0])), 3.5 / 9, 1e-6)


def test_cv_squared_of_all_zeros_is_zero_not_nan():
    assert float(losses.cv_squared(jnp.zeros((4,)))) == 0.0


def test_importance_loss_sums_gates_over_tokens():
    gates = jnp.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    # Importance [0.5, 1.5, 0]: mean 2/3, variance 7/18, cv^2 = (7/18) / (4/9) = 7/8.
    np.testing.assert_allclose(losses.importance_loss(gates), 7 / 8, rtol=1e-6)


def test_load_loss_is_cv_squared_of_load():
    np.testing.assert_allclose(losses.load_loss(jnp.array([2.0, 2.0, 2.0, 2.0])), 0.0)
    np.testing.assert_allclose(losses.load_loss(jnp.array([4.0, 0.0])), 1.0, rtol=1e-6)


def test_switch_balance_loss_hand_value():
    probs = jnp.array([[0.8, 0.2], [0.6, 0.4]])
    # P = [0.7, 0.3], f = [1, 0]: E * sum f P = 2 * 0.7.
    np.testing.assert_allclose(
        losses.switch_balance_loss(probs, jnp.array([1.0, 0.0])), 1.4, rtol=1e-6
    )


@pytest.mark.parametrize("num_experts", [1, 3, 8])
def test_switch_balance_loss_is_one_under_uniform_routing(num_experts):
    probs = jnp.full((16, num_experts), 1.0 / num_experts)
    fraction = jnp.full((num_experts,), 1.0 / num_experts)
    np.testing.assert_allclose(losses.switch_balance_loss(probs, fraction), 1.0, rtol=1e-6)
    # Balanced choices make P irrelevant: sum_i P_i = 1.
    peaked = jax.nn.softmax(jax.random.normal(jax.random.key(0), (16, num_experts)) * 3)
    np.testing.assert_allclose(losses.switch_balance_loss(peaked, fraction), 1.0, rtol=1e-6)


def test_switch_balance_loss_ignores_masked_tokens():
    probs = jnp.array([[0.8, 0.2], [0.6, 0.4], [0.0, 1.0]])
    mask = jnp.array([True, True, False])
    got = losses.switch_balance_loss(probs, jnp.array([1.0, 0.0]), mask)
    np.testing.assert_allclose(got, 1.4, rtol=1e-6)


def test_switch_balance_loss_gradient_flows_to_probabilities_only():
    probs = jnp.array([[0.8, 0.2], [0.6, 0.4]])
    fraction = jnp.array([0.75, 0.25])
    g_probs, g_fraction = jax.grad(losses.switch_balance_loss, argnums=(0, 1))(probs, fraction)
    np.testing.assert_allclose(g_probs, [[0.75, 0.25], [0.75, 0.25]], rtol=1e-6)  # E * f / T
    np.testing.assert_array_equal(g_fraction, 0.0)  # f is a count, held constant


def test_router_z_loss_hand_value_and_mask():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [50.0, 0.0]])
    # logsumexp: log 2, log 4 (the third token is padding).
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    got = losses.router_z_loss(logits, jnp.array([True, True, False]))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(losses.router_z_loss(logits[:2]), want, rtol=1e-6)


def test_router_z_loss_is_float32_and_differentiable_for_bfloat16_logits():
    logits = jnp.array([[1.0, 2.0, 3.0]], jnp.bfloat16)
    assert losses.router_z_loss(logits).dtype == jnp.float32
    grad = jax.grad(lambda x: losses.router_z_loss(x))(logits.astype(jnp.float32))
    # d/dx lse(x)^2 = 2 lse(x) softmax(x)
    lse = float(jax.nn.logsumexp(jnp.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(grad[0], 2 * lse * jax.nn.softmax(jnp.array([1.0, 2.0, 3.0])), 1e-5)
