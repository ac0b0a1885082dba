"""Where the training state and batches live: the mesh, state shardings, jitted programs.

A :class:`Placement` is made once per run from the experiment: the mesh, the model's structure
(``graphdef``), the optimizer, and the shardings of the whole train state, all known before
anything is allocated (shapes from ``jax.eval_shape``). Parameters are born sharded: one jitted
init with ``out_shardings``. Optimizer state follows its parameters' shardings; counters are
replicated. Batches are split by rows over ``('data', 'expert')``; each process contributes
its own rows. :func:`state_specs` gives the same shardings as strings on an abstract mesh, for
the golden sharding tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from moe.config import Experiment
from moe.layers.router import RouterBias
from moe.parallel.axes import logical_to_mesh
from moe.parallel.mesh import (
    batch_sharding,
    build_mesh,
    named_shardings,
    param_specs,
    specs_as_strings,
)
from moe.training import build
from moe.training import state as state_lib


def _state_specs(
    abstract_params: Any, abstract_bias: Any, optimizer, mesh: Mesh | AbstractMesh
) -> Any:
    """TrainState of PartitionSpecs: parameters by their logical axes, optimizer state like
    its parameters, everything else (counters, router biases) replicated."""
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
    r = PartitionSpec()
    bias_specs = param_specs(abstract_bias, mesh)  # no logical axes: replicated
    return state_lib.TrainState(r, p_specs, opt_specs, r, r, bias_specs)


def _abstract_params(model_fn: Callable[[], nnx.Module]) -> tuple[Any, Any, Any]:
    """``(graphdef, params, router_bias)`` of the model, as shapes."""
    return nnx.split(nnx.eval_shape(model_fn), nnx.Param, RouterBias)


class Placement:
    """The run's mesh and the placement of its state; jitted programs run under the mesh.

    Attributes:
      mesh: the device mesh (``('data', 'expert'[, 'model'])``).
      graphdef: the model's structure (static).
      optimizer: the optax transformation the state was shaped for.
      state_shardings: ``TrainState`` of ``NamedSharding``s.
      abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct``s with those shardings (the
        target of a checkpoint restore).
      programs: jitted evaluation/decoding programs of this run by (kind, ...), dropped with it
        (they close over the run's eval settings).
    """

    def __init__(self, mesh: Mesh, model_fn: Callable[[], nnx.Module], optimizer):
        self.mesh, self.optimizer, self._model_fn = mesh, optimizer, model_fn
        self.graphdef, abstract_params, abstract_bias = _abstract_params(model_fn)
        specs = _state_specs(abstract_params, abstract_bias, optimizer, mesh)
        self.state_shardings = named_shardings(specs, mesh)
        abstract = jax.eval_shape(lambda: state_lib.create(model_fn(), optimizer)[1])
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        self.programs: dict[Any, Callable] = {}

    @classmethod
    def for_experiment(cls, exp: Experiment) -> Placement:
        return cls(
            build_mesh(exp.mesh_shape), lambda: build.build_model(exp), build.build_optimizer(exp)
        )

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def init_state(self) -> state_lib.TrainState:
        """A fresh TrainState with every array born with its sharding."""
        with jax.set_mesh(self.mesh):
            return jax.jit(
                lambda: state_lib.create(self._model_fn(), self.optimizer)[1],
                out_shardings=self.state_shardings,
            )()

    def batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from this process's rows (contiguous, in process order)."""
        out = {}
        for k, v in host.items():
            sharding = batch_sharding(self.mesh, v.ndim)
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
        return out

    def abstract_batch(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """ShapeDtypeStructs (int32, batch-sharded) of a global batch with these shapes."""
        return {
            k: jax.ShapeDtypeStruct(v, np.int32, sharding=batch_sharding(self.mesh, len(v)))
            for k, v in shapes.items()
        }

    def jit_train_step(self, fn: Callable, extra_args: int = 0) -> Callable:
        """``fn(state, batch, key, *extra) -> (state, metrics)`` jitted with the state's
        shardings in and out, the state donated, metrics replicated; ``extra_args`` more
        positional arguments keep their own shardings (a teacher's parameters: moe distill)."""
        jitted = jax.jit(
            fn,
            in_shardings=(self.state_shardings, None, None, *(None,) * extra_args),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        return _InMesh(jitted, self.mesh)

    def jit(self, fn: Callable, **kw) -> Callable:
        return _InMesh(jax.jit(fn, **kw), self.mesh)


class _InMesh:
    """A jitted function called with the mesh set, so layers that exchange over mesh axes
    (the MoE block's all-to-all) see it. ``lower`` is passed through for the cost model."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def state_specs(exp: Experiment) -> dict[str, str]:
    """``{"params/encoder/1/ffn/experts/w_in": "'expert', None, None", "opt_state/...": ...,
    "batch/src": "('data', 'expert'), None"}`` for ``exp`` on its mesh (an ``AbstractMesh``:
    no devices needed). Stored per config under ``tests/parallel/golden/`` and compared by a
    test, so a change that moves any array to another sharding shows up as a diff (MaxText's
    golden sharding tests)."""
    shape = exp.mesh_shape
    mesh = AbstractMesh(tuple(shape.values()), tuple(shape))
    _, abstract_params, abstract_bias = _abstract_params(lambda: build.build_model(exp))
    specs = _state_specs(abstract_params, abstract_bias, build.build_optimizer(exp), mesh)
    batch = {k: logical_to_mesh(("batch", None), mesh) for k in ("src", "tgt_in", "tgt_out")}
    batch["task"] = logical_to_mesh(("batch",), mesh)
    return {
        **specs_as_strings(specs.params, "params"),
        **specs_as_strings(specs.opt_state, "opt_state"),
        **specs_as_strings(specs.router_bias, "router_bias"),
        **specs_as_strings(batch, "batch"),
    }
