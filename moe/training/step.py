"""train_step / eval_step: pure functions of (state, batch, key), jitted by the loop.

A batch is a dict of int32 arrays: ``src [B, Ls]``, ``tgt_in [B, Lt]``, ``tgt_out [B, Lt]``
(0 = padding) and ``task [B]``. The loss is token-level cross-entropy over the non-pad targets
plus the MoE layers' aux and z losses with their configured weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.config import Experiment
from moe.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossWeights:
    aux: float
    z: float


def _forward(graphdef, params, batch, key, *, train: bool):
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=jax.random.fold_in(key, 0), router=jax.random.fold_in(key, 1))
    return model(batch["src"], batch["tgt_in"], batch["task"], train=train, rngs=rngs)


def token_nll(logits, targets):
    """Per-token negative log-likelihood, float32[B, L] (0 at padding) and the pad mask."""
    mask = targets != 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, nll, 0.0), mask


def _per_task(values_b, task_b, num_tasks):
    return jax.ops.segment_sum(values_b, task_b, num_segments=num_tasks)


def loss_and_metrics(
    params, graphdef, batch, key, weights: LossWeights, num_tasks: int, train, teacher=None
):
    logits, aux = _forward(graphdef, params, batch, key, train=train)
    nll, mask = token_nll(logits, batch["tgt_out"])
    tokens = jnp.maximum(mask.sum(), 1)
    ce = nll.sum() / tokens
    aux_loss = sum((a.aux_loss for a in aux.values()), jnp.float32(0))
    z_loss = sum((a.z_loss for a in aux.values()), jnp.float32(0))
    # `moe distill`: a teacher (moe.serving.distill.Teacher, a pytree passed into the step)
    # turns the CE term into alpha * CE + (1 - alpha) * T^2 * KL; `ce` stays the labels' CE.
    fit, kd = (ce, {}) if teacher is None else teacher.objective(batch, logits, nll, mask)
    loss = fit + weights.aux * aux_loss + weights.z * z_loss
    metrics = {
        **kd,
        "loss": loss,
        "ce": ce,
        "aux_loss": aux_loss,
        "z_loss": z_loss,
        "task_nll": _per_task(nll.sum(-1), batch["task"], num_tasks),
        "task_tokens": _per_task(mask.sum(-1).astype(jnp.float32), batch["task"], num_tasks),
        "moe": {
            name: {"aux_loss": a.aux_loss, "z_loss": a.z_loss, **a.stats} for name, a in aux.items()
        },
    }
    return loss, metrics


def grads_and_metrics(
    state: TrainState, graphdef, batch, key, weights, num_tasks, accum: int, teacher=None
):
    """Gradients of the mean loss over ``accum`` micro-batches (a scan; 1 = one pass)."""
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    if accum == 1:
        return grad_fn(state.params, graphdef, batch, key, weights, num_tasks, True, teacher)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, xs):
        g_sum, i = carry
        g, m = grad_fn(
            state.params, graphdef, xs, jax.random.fold_in(key, i), weights, num_tasks, True,
            teacher,
        )  # fmt: skip
        return (jax.tree.map(jnp.add, g_sum, g), i + 1), m

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (g_sum, _), ms = jax.lax.scan(body, (zeros, 0), micro)
    grads = jax.tree.map(lambda g: g / accum, g_sum)
    sums = ("task_nll", "task_tokens")
    metrics = {
        k: (v.sum(0) if k in sums else jax.tree.map(lambda x: x.mean(0), v)) for k, v in ms.items()
    }
    return grads, metrics


def train_step(
    state: TrainState,
    batch,
    key,
    teacher=None,
    *,
    graphdef,
    optimizer,
    weights,
    num_tasks,
    accum: int = 1,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step. A non-finite loss or gradient skips the update and is counted
    (``bad_steps`` consecutive, ``skipped`` total); the loop stops after too many.
    ``teacher``: see ``loss_and_metrics`` (``moe distill``); None trains on the labels."""
    key = jax.random.fold_in(key, state.step)
    grads, metrics = grads_and_metrics(
        state, graphdef, batch, key, weights, num_tasks, accum, teacher
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics


def eval_step(params, batch, *, graphdef, weights, num_tasks) -> dict[str, Any]:
    """Held-out metrics for one batch (no dropout, eval capacity factor)."""
    _, metrics = loss_and_metrics(
        params, graphdef, batch, jax.random.key(0), weights, num_tasks, False
    )
    return metrics


def make_train_step(exp: Experiment, graphdef, optimizer, num_tasks: int | None = None) -> Callable:
    """``train_step`` with the experiment's static arguments bound: ``(state, batch, key) ->
    (state, metrics)``, ready for ``Placement.jit_train_step``."""
    return functools.partial(
        train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        weights=LossWeights(aux=exp.moe.aux_loss_weight, z=exp.moe.z_loss_weight),
        num_tasks=len(exp.tasks) if num_tasks is None else num_tasks,
        accum=exp.train.grad_accum,
    )
