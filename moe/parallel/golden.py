"""Partition specs of an experiment's whole training state and batch, as plain strings.

Stored per config under ``tests/parallel/golden/`` and compared by a test, so a change to the
rules table, a layer's logical axes or the optimizer that moves any array to a different
sharding shows up as a diff (MaxText's golden sharding tests). Computed on an ``AbstractMesh``
of the config's mesh shape: no devices are needed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from moe.config import Experiment
from moe.parallel.axes import logical_to_mesh, spec_to_str
from moe.parallel.mesh import param_specs


def _flat(tree: Any, prefix: str) -> dict[str, str]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    out = {}
    for path, spec in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        out[f"{prefix}/{name}"] = spec_to_str(spec)
    return out


def state_specs(exp: Experiment) -> dict[str, str]:
    """``{"params/encoder/1/ffn/experts/w_in": "'expert', None, None", "opt_state/...": ...,
    "batch/src": "('data', 'expert'), None"}`` for ``exp`` on its mesh."""
    from moe.training import build

    shape = exp.mesh_shape
    mesh = AbstractMesh(tuple(shape.values()), tuple(shape))
    model_fn = lambda: build.build_model(exp)  # noqa: E731
    optimizer = build.build_optimizer(exp)
    _, abstract_params = nnx.split(nnx.eval_shape(model_fn), nnx.Param)
    p_specs = param_specs(abstract_params, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_specs = optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        abstract_opt,
        p_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    batch = {k: logical_to_mesh(("batch", None), mesh) for k in ("src", "tgt_in", "tgt_out")}
    batch["task"] = logical_to_mesh(("batch",), mesh)
    return {**_flat(p_specs, "params"), **_flat(opt_specs, "opt_state"), **_flat(batch, "batch")}
