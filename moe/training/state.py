"""The training state: a plain pytree (parameters, optimizer state, counters)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes. The model's structure (``graphdef``) is static and
    kept outside; the RNG for step ``s`` is ``fold_in(seed_key, s)``, so no key is stored and a
    resumed run draws exactly the same randomness.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: nnx.State of the model's ``nnx.Param`` leaves.
      opt_state: the optax state.
      bad_steps: int32, consecutive steps skipped for non-finite loss or gradients.
      skipped: int32, total skipped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    bad_steps: jax.Array
    skipped: jax.Array


def create(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split the model into (graphdef, TrainState). Call inside ``jax.jit``/``eval_shape`` to get
    shapes, or under ``jax.jit(out_shardings=...)`` to have parameters born sharded."""
    graphdef, params = nnx.split(model, nnx.Param)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(zero, params, optimizer.init(params), zero, zero)


def num_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
