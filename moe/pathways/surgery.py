"""Surgery on a trained model's expert dimension: restore, select or append experts, save.

``moe extract`` keeps a subset of each MoE layer's experts; ``moe grow`` appends copies of
experts. Both edit the same leaves, found by their tree path (see ``moe.pathways.usage``):

    <stack>/<i>/ffn/experts/{w_in, b_in, w_out, b_out}   [E, ...]  experts along axis 0
    <stack>/<i>/ffn/router/{w_gate, w_noise}             [d, E]    experts along axis 1

and leave every other parameter as it is. The result is written as an ordinary run directory
(``config.yaml`` + a checkpoint with a fresh optimizer state, or a kept one), so ``moe eval``,
``moe train`` (resume) and ``moe report`` work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import config as cfg
from moe.errors import UserError
from moe.training import build
from moe.training import state as state_lib
from moe.training.checkpoint import Checkpointer
from moe.training.freeze import path_names
from moe.training.pathway_spec import EXPERT_LEAVES, ROUTER_LEAVES

QUANT_SCALES = ("w_in_scale", "w_out_scale")  # [E, 1, ...] of a quantised bank (moe quantize)


def check_supported(exp: cfg.Experiment, command: str) -> None:
    """User error for routing that surgery cannot carry over: the router biases of loss-free
    balancing (not edited with the router columns yet) and device-limited routing (which
    depends on how the experts split over devices, and surgery changes the expert count)."""
    m = exp.moe
    for key, value in (
        ("bias_balance_rate", m.bias_balance_rate),
        ("device_limit", m.device_limit),
    ):
        if value:
            raise UserError(
                f"{command}: runs with moe.{key}={value} are not supported (surgery keeps "
                "neither router biases nor device groups)"
            )


def expert_axis(path: tuple) -> tuple[str, int] | None:
    """``(layer, axis)`` if the leaf at ``path`` holds one slice per expert, else None."""
    names = path_names(path)
    if len(names) != 5 or names[2] != "ffn":
        return None
    layer = f"{names[0]}/{names[1]}"
    if names[3] == "experts" and names[4] in (*EXPERT_LEAVES, *QUANT_SCALES):
        return layer, 0
    if names[3] == "router" and names[4] in ROUTER_LEAVES:
        return layer, 1
    if names[3] == "router":
        raise UserError(f"{layer}: the {names[4]} router weights cannot be split by expert")
    return None


def map_experts(params: Any, fn: Callable[[str, int, np.ndarray], np.ndarray]) -> Any:
    """``params`` (on the host, numpy) with ``fn(layer, axis, leaf)`` applied to each
    per-expert leaf; other leaves unchanged."""

    def one(path, leaf):
        leaf = np.asarray(jax.device_get(leaf))
        where = expert_axis(path)
        return leaf if where is None else fn(where[0], where[1], leaf)

    return jax.tree_util.tree_map_with_path(one, params)


def take_experts(params: Any, keep: Mapping[str, Sequence[int]]) -> Any:
    """Keep experts ``keep[layer]`` (in that order) of each listed layer."""
    return map_experts(
        params,
        lambda layer, axis, x: np.take(x, list(keep[layer]), axis=axis) if layer in keep else x,
    )


def append_experts(params: Any, sources: Mapping[str, Sequence[int]]) -> Any:
    """Append to each listed layer one copy of expert ``s`` for every ``s`` in
    ``sources[layer]`` (weights and router column): new expert ``E + j`` clones ``sources[j]``."""

    def grow(layer, axis, x):
        if layer not in sources or not sources[layer]:
            return x
        return np.concatenate([x, np.take(x, list(sources[layer]), axis=axis)], axis=axis)

    return map_experts(params, grow)


def write_run(
    exp: cfg.Experiment, run_dir: Path, params: Any, step: int, meta: dict, opt_state: Any = None
) -> None:
    """A run directory for ``exp`` whose checkpoint ``step`` holds ``params`` (host arrays in
    the tree structure of ``exp``'s model) and a fresh optimizer state, or ``opt_state`` (in
    the structure of ``exp``'s optimizer state; ``moe place --apply`` keeps it)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints; choose another name or delete it")
    abstract = nnx.split(nnx.eval_shape(lambda: build.build_model(exp)), nnx.Param)[1]
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(
        want
    ) != jax.tree.leaves(got):
        raise ValueError("edited parameters do not match the model of the new config")
    params = jax.tree.map(jnp.asarray, params)
    optimizer = build.build_optimizer(exp)
    fresh = optimizer.init(params)
    if opt_state is not None:
        if jax.tree.structure(opt_state) != jax.tree.structure(fresh):
            raise ValueError("the optimizer state does not match the new config's optimizer")
        fresh = jax.tree.map(jnp.asarray, opt_state)
    zero = jnp.zeros((), jnp.int32)
    no_bias = nnx.State({})  # check_supported: no router biases
    state = state_lib.TrainState(jnp.int32(step), params, fresh, zero, zero, no_bias)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.dump(exp), encoding="utf-8")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep)
    ckpt.save(step, state, {"examples_seen": [0] * len(exp.tasks), **meta})
    ckpt.close()


def num_params(params: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))
