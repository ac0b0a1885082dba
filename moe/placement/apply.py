"""``moe place RUN_DIR --apply --out OUT_DIR``: the run with each MoE layer's experts
permuted, so that new expert ``j`` is old expert ``order[layer][j]`` and the expert axis puts
them on the chosen devices (column ``c`` holds new experts ``[c E/EP, (c+1) E/EP)``).

Everything indexed by expert moves together: the expert weights ``[E, ...]`` and router columns
``[d, E]`` (``moe.pathways.surgery``), their optimizer state rows (Adam/AdamW moments, the sign
rules' ``m``, found with ``optax.tree_map_params``), and the pathway masks
(``tasks[i].experts``). The checkpoint keeps its step and data position, so ``moe train``
continues the run as if nothing had moved.

Why the outputs do not change: every router here is equivariant under a permutation of the
experts (top-k and expert-choice pick by value; slots fill in token order per expert; capacity
counts experts, not their ids) and the combine adds one term per kept expert. What changes
is float rounding: the router softmax sums its ``E`` exponentials in another order (and a
token's ``k > 2`` combine terms too; for ``k = 2``, ``a + b == b + a`` exactly), so gates, and
through them logits, agree to float rounding, not bit for bit: measured on the tests' tiny
model (E = 4, one device) the largest logit difference is ~1e-6, the losses agree to ~1e-7
relative and the greedy decodes are identical; on a 4-device run with E = 8 the evaluation's
losses and decodes came out identical. Top-k ties (equal logits) would break by index and so
could pick another expert; with float logits they do not occur in practice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from moe import config as cfg
from moe.errors import UserError
from moe.pathways import surgery
from moe.training import pathway_spec
from moe.training.checkpoint import Checkpointer
from moe.training.restore import run_config
from moe.training.sharding import Placement

Orders = Mapping[str, Sequence[int]]  # layer -> old expert of each new expert


def check_placeable(exp: cfg.Experiment, *, apply: bool) -> None:
    """User errors: nothing to place, or a layout that cannot be permuted."""
    if not exp.moe_layers:
        raise UserError("place: the model has no MoE layer; there are no experts to place")
    if "hierarchical" in (exp.moe.router, exp.moe.decoder_router):
        raise UserError("place: hierarchical routers fix their expert groups by index")
    if not apply:
        return
    if pathway_spec.frozen_tasks(exp):
        raise UserError(
            "place --apply: the run has frozen tasks (a grown run), whose optimizer state "
            "holds only the trainable rows; place its parent run instead"
        )
    if exp.train.optimizer == "adafactor":
        raise UserError(
            "place --apply: adafactor's factored state mixes the expert rows; use a run "
            "trained with adam, adamw, powersign or addsign"
        )


def _check_orders(exp: cfg.Experiment, orders: Orders) -> None:
    for layer in exp.moe_layers:
        order = list(orders.get(layer, range(exp.experts_in(layer))))
        if sorted(order) != list(range(exp.experts_in(layer))):
            raise ValueError(f"{layer}: {order} is not a permutation of its experts")


def permuted_experiment(exp: cfg.Experiment, orders: Orders, out: Path) -> cfg.Experiment:
    """``exp`` named after ``out`` (``moe train OUT/config.yaml`` resumes in ``out``), with
    every task's pathway renumbered (as one list per layer: the layers permute differently)."""
    raw = exp.model_dump(mode="json")
    raw["name"], raw["runs_dir"] = out.name, str(out.parent)
    raw["moe"]["grown_experts"] = []  # permuted experts no longer split into growth blocks
    new_id = {
        layer: {int(old): new for new, old in enumerate(order)} for layer, order in orders.items()
    }
    for i, task in enumerate(raw["tasks"]):
        if task["experts"] is None:
            continue
        renumbered = {}
        for layer in exp.moe_layers:
            ids = pathway_spec.task_experts(exp, i, layer)
            renumbered[layer] = sorted(new_id.get(layer, {}).get(x, x) for x in ids)
        task["experts"] = renumbered
    return cfg.from_dict(raw, where=f"placed config of {exp.name}")


class _Where:
    """A leaf marker: the (layer, axis) of a per-expert parameter, or None."""

    def __init__(self, where):
        self.where = where


def permute_state(params: Any, opt_state: Any, optimizer, orders: Orders) -> tuple[Any, Any]:
    """``(params, opt_state)`` with each listed layer's experts taken in ``orders`` order."""

    def take(layer, axis, x):
        return np.take(x, list(orders[layer]), axis=axis) if layer in orders else x

    new_params = surgery.map_experts(params, take)
    where = jax.tree_util.tree_map_with_path(
        lambda path, _: _Where(surgery.expert_axis(path)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

    def one(leaf, marker):
        value = np.asarray(
            jax.device_get(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
        )
        if marker.where is not None:
            value = take(*marker.where, value)
        return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value

    new_opt = optax.tree_map_params(
        optimizer,
        one,
        opt_state,
        where,
        transform_non_params=lambda x: np.asarray(jax.device_get(x)),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return new_params, new_opt


def apply_placement(run_dir: Path, orders: Orders, out: Path, step: int | None = None) -> dict:
    """Write ``run_dir``'s checkpoint (latest, or ``step``) with its experts permuted by
    ``orders`` to the run directory ``out``; returns a manifest (also ``out/placed.json``)."""
    run_dir, out = Path(run_dir), Path(out)
    exp = run_config(run_dir)
    check_placeable(exp, apply=True)
    _check_orders(exp, orders)
    placement = Placement.for_experiment(exp)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep)
    steps = ckpt.all_steps()
    if not steps:
        raise UserError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    if step is not None and step not in steps:
        raise UserError(f"{run_dir / 'checkpoints'} has no step {step} (has {steps})")
    step = max(steps) if step is None else step
    state, meta = ckpt.restore(step, placement.abstract_state)
    ckpt.close()
    params, opt_state = permute_state(state.params, state.opt_state, placement.optimizer, orders)
    child = permuted_experiment(exp, orders, out)
    keep = {k: v for k, v in meta.items() if k not in ("step", "leaves")}
    surgery.write_run(child, out, params, step, {**keep, "placed_from": str(run_dir)}, opt_state)
    return {"parent": str(run_dir), "out": str(out), "step": step, "permutation": dict(orders)}
