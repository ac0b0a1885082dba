"""Slot filling: choice-major queues, processing order, inactive choices."""

import jax
import jax.numpy as jnp
import numpy as np

from moe.routing import slots

_fill = jax.jit(slots.fill_slots, static_argnames=("num_experts", "capacity"))


def test_inactive_choices_take_no_slot_and_order_sets_priority():
    experts = jnp.array([[0, 1], [0, 1], [1, 0]])  # [T=3, k=2]
    gates = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    active = jnp.array([[True, True], [True, False], [True, True]])
    order = jnp.array([2, 1, 0])
    s = _fill(experts, gates, active, num_experts=2, capacity=2, order=order)
    # First choices in order 2, 1, 0: expert 1 <- 2; expert 0 <- 1, 0. Second choices: token 2
    # wants expert 0 (full, dropped), token 1's is inactive, token 0 gets expert 1's last slot.
    np.testing.assert_array_equal(s.slot_token, [[1, 0], [2, 0]])
    np.testing.assert_allclose(s.slot_weight, [[0.7, 0.6], [0.9, 0.4]])
    np.testing.assert_array_equal(s.kept, [[True, True], [True, False], [True, False]])
    np.testing.assert_array_equal(s.position[:, 0], [1, 0, 0])
    assert int(s.position[2, 1]) == 2  # queued third at a full expert
