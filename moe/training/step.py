"""train_step / eval_step: pure functions of (state, batch, key), jitted by the loop.

A batch is a dict of int32 arrays (``moe.data.packing.BATCH_KEYS``): ``src [B, Ls]``,
``tgt_in [B, Lt]``, ``tgt_out [B, Lt]`` (0 = padding) and, per token, the segment (example),
position and task ids of packed rows (``src_segment``, ... ``tgt_task``); or, one example a row,
``task [B]`` instead of the per-token ids. The loss is token-level cross-entropy over the
non-pad targets plus the MoE layers' aux and z losses with their configured weights.
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
from moe.layers.transformer import Segments
from moe.training.state import TrainState, update_router_bias


@dataclasses.dataclass(frozen=True)
class LossWeights:
    aux: float
    z: float
    label_smoothing: float = 0.0  # training only; metrics report the plain NLL


def segments(batch) -> tuple[Segments, Segments] | None:
    """The (source, target) ``Segments`` of a packed batch; None for one example a row."""
    if "src_segment" not in batch:
        return None
    return tuple(
        Segments(batch[f"{side}_segment"], batch[f"{side}_position"], batch[f"{side}_task"])
        for side in ("src", "tgt")
    )


def target_task(batch) -> jax.Array:
    """int32[B, Lt]: the task of every target position."""
    if "tgt_task" in batch:
        return batch["tgt_task"]
    return jnp.broadcast_to(batch["task"][:, None], batch["tgt_out"].shape)


def _forward(graphdef, params, batch, key, *, train: bool, router_bias=None):
    # router_bias: the RouterBias state, when ``params`` holds only the nnx.Param leaves
    model = nnx.merge(graphdef, params, *([] if router_bias is None else [router_bias]))
    rngs = nnx.Rngs(dropout=jax.random.fold_in(key, 0), router=jax.random.fold_in(key, 1))
    return model(
        batch["src"], batch["tgt_in"], batch.get("task"), train=train, rngs=rngs,
        segments=segments(batch),
    )  # fmt: skip


def token_nll(logits, targets):
    """Per-token negative log-likelihood, float32[B, L] (0 at padding) and the pad mask."""
    mask = targets != 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, nll, 0.0), mask


def smoothed_nll(logits, nll, mask, smoothing: float):
    """Label-smoothed per-token loss ``(1 - s) nll + s mean_v(-log p_v)`` (Szegedy et al. 2016,
    uniform prior), 0 at padding."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return (1 - smoothing) * nll - smoothing * jnp.where(mask, logp.mean(-1), 0.0)


def _per_task(values, task, num_tasks):
    return jax.ops.segment_sum(values.reshape(-1), task.reshape(-1), num_segments=num_tasks)


def loss_and_metrics(
    params,
    graphdef,
    batch,
    key,
    weights: LossWeights,
    num_tasks: int,
    train,
    router_bias=None,
    teacher=None,
):
    logits, aux = _forward(graphdef, params, batch, key, train=train, router_bias=router_bias)
    nll, mask = token_nll(logits, batch["tgt_out"])
    tokens = jnp.maximum(mask.sum(), 1)
    ce = nll.sum() / tokens
    aux_loss = sum((a.aux_loss for a in aux.values()), jnp.float32(0))
    z_loss = sum((a.z_loss for a in aux.values()), jnp.float32(0))
    objective, kd = ce, {}
    if teacher is not None:
        # `moe distill`: a teacher (moe.serving.distill.Teacher, a pytree passed into the step)
        # turns the CE term into alpha * CE + (1 - alpha) * T^2 * KL; `ce` stays the labels' CE.
        objective, kd = teacher.objective(batch, logits, nll, mask)
    elif train and weights.label_smoothing:  # the metrics keep the plain NLL
        objective = smoothed_nll(logits, nll, mask, weights.label_smoothing).sum() / tokens
    loss = objective + weights.aux * aux_loss + weights.z * z_loss
    metrics = {
        **kd,
        "loss": loss,
        "ce": ce,
        "aux_loss": aux_loss,
        "z_loss": z_loss,
        "task_nll": _per_task(nll, target_task(batch), num_tasks),
        "task_tokens": _per_task(mask.astype(jnp.float32), target_task(batch), num_tasks),
        "moe": {
            name: {"aux_loss": a.aux_loss, "z_loss": a.z_loss, **a.stats} for name, a in aux.items()
        },
    }
    return loss, metrics


def grads_and_metrics(
    state: TrainState, graphdef, batch, key, weights, num_tasks, accum: int, teacher=None
):
    """Gradients of the mean loss over ``accum`` micro-batches (a scan; 1 = one pass)."""
    grad_fn = functools.partial(
        jax.grad(loss_and_metrics, has_aux=True), router_bias=state.router_bias, teacher=teacher
    )
    if accum == 1:
        return grad_fn(state.params, graphdef, batch, key, weights, num_tasks, True)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, xs):
        g_sum, i = carry
        g, m = grad_fn(
            state.params, graphdef, xs, jax.random.fold_in(key, i), weights, num_tasks, True
        )
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
    bias_rate: float = 0.0,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step. A non-finite loss or gradient, or an update that blows the parameters
    up (``sane_update``), skips the step and is counted (``bad_steps`` consecutive, ``skipped``
    total); the loop stops after too many. The router
    biases move by ``bias_rate`` against the step's load (``state.update_router_bias``).
    ``teacher``: see ``loss_and_metrics`` (``moe distill``); None trains on the labels."""
    key = jax.random.fold_in(key, state.step)
    grads, metrics = grads_and_metrics(
        state, graphdef, batch, key, weights, num_tasks, accum, teacher
    )
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = (
        jnp.isfinite(metrics["loss"])
        & jnp.isfinite(grad_norm)
        & sane_update(state.params, new_params)
    )
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    router_bias, biases = update_router_bias(graphdef, state, metrics["moe"], bias_rate, finite)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        # Auxiliary-loss-free balancing: outside the optimizer, skipped with the step.
        router_bias=router_bias,
    )
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    for layer, bias in biases.items():  # the new bias, for metrics.jsonl and the report
        metrics["moe"][layer] = {**metrics["moe"][layer], "router_bias": bias}
    return new_state, metrics


# An update may grow the parameters' global norm at most this many times (plus 1) in one step.
# Real steps change it by a few percent; learning_rate=1e30 multiplies it by ~1e30 while the loss
# and gradients of that step are still finite.
MAX_NORM_GROWTH = 1e3


def sane_update(old_params, new_params) -> jax.Array:
    """True when the updated parameters are finite and their global norm has not exploded."""
    old, new = optax.tree.norm(old_params), optax.tree.norm(new_params)
    return jnp.isfinite(new) & (new <= MAX_NORM_GROWTH * (old + 1.0))


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
        weights=LossWeights(
            aux=exp.moe.aux_loss_weight,
            z=exp.moe.z_loss_weight,
            label_smoothing=exp.train.label_smoothing,
        ),
        num_tasks=len(exp.tasks) if num_tasks is None else num_tasks,
        accum=exp.train.grad_accum,
        bias_rate=exp.moe.bias_balance_rate,
    )
