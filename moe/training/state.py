"""The training state: a plain pytree (parameters, optimizer state, counters, router biases)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.layers.router import RouterBias
from moe.routing.balance import bias_update


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
      router_bias: nnx.State of the model's ``RouterBias`` leaves (the selection biases of
        auxiliary-loss-free balancing; empty when no layer has one): model state the
        optimizer never sees, moved by ``update_router_bias`` after each step. Last, so a
        model without biases has exactly the checkpoint leaves it had before they existed.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    bad_steps: jax.Array
    skipped: jax.Array
    router_bias: Any


def create(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split the model into (graphdef, TrainState). Call inside ``jax.jit``/``eval_shape`` to get
    shapes, or under ``jax.jit(out_shardings=...)`` to have parameters born sharded."""
    graphdef, params, router_bias = nnx.split(model, nnx.Param, RouterBias)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(zero, params, optimizer.init(params), zero, zero, router_bias)


def model_state(state: TrainState) -> Any:
    """Everything the model reads (parameters and router biases) as one ``nnx.State``, for
    ``nnx.merge(graphdef, model_state(state))``: what evaluation and decoding take."""
    return nnx.merge_state(state.params, state.router_bias)


def update_router_bias(
    graphdef, state: TrainState, moe_metrics: dict, rate: float, apply: Any = True
) -> tuple[Any, dict[str, jax.Array]]:
    """The router biases after one step of auxiliary-loss-free balancing (``moe.routing.balance``):
    each MoE layer's bias moves by ``rate * sign(mean load - load)``, the load being the step's
    ``choices_per_expert`` (selection before capacity; a mean over routing groups and
    micro-batches, proportional to their sum, so the sign is that of the whole mesh's load).

    ``apply``: a bool (array); False keeps the old biases (a skipped step). Returns
    ``(router_bias state, {layer: its bias [E]})``; the state unchanged and ``{}`` when ``rate``
    is 0 or no layer has a bias."""
    if rate == 0 or not jax.tree.leaves(state.router_bias):
        return state.router_bias, {}
    model = nnx.merge(graphdef, state.params, state.router_bias)
    new = {}
    for layer, block in model.moe_blocks().items():
        bias = block.router.bias
        if bias is not None:
            moved = bias_update(bias[...], moe_metrics[layer]["choices_per_expert"], rate)
            bias[...] = new[layer] = jnp.where(apply, moved, bias[...])
    return nnx.state(model, RouterBias), new


def num_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
