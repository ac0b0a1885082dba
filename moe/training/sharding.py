"""Where the training state and batches live: the mesh, state shardings, jitted steps.

Parameters are born sharded: shapes come from ``jax.eval_shape``, then one jitted init with
``out_shardings`` (nothing is first materialised on one device). Optimizer state follows its
parameters' shardings; counters are replicated. Batches are split by rows over
``('data', 'expert')``; each process contributes its own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe.config import Experiment
from moe.parallel.mesh import batch_sharding, build_mesh, param_shardings
from moe.training import state as state_lib


@dataclasses.dataclass
class Placement:
    mesh: Mesh
    state_shardings: Any = None
    # Jitted evaluation/decoding programs of this run, by (kind, graphdef): one per run,
    # dropped with it (they close over the run's eval settings).
    programs: dict[Any, Callable] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_experiment(cls, exp: Experiment) -> Placement:
        return cls(build_mesh(exp.mesh_shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def init_state(self, model_fn: Callable[[], nnx.Module], optimizer):
        """(graphdef, TrainState) with every array born with its sharding."""
        graphdef, _ = self.abstract_state(model_fn, optimizer)
        with jax.set_mesh(self.mesh):
            state = jax.jit(
                lambda: state_lib.create(model_fn(), optimizer)[1],
                out_shardings=self.state_shardings,
            )()
        return graphdef, state

    def abstract_state(self, model_fn: Callable[[], nnx.Module], optimizer):
        """(graphdef, TrainState of ShapeDtypeStructs with shardings); allocates nothing."""
        abstract_model = nnx.eval_shape(model_fn)
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        p_shard = param_shardings(abstract_params, self.mesh)
        abstract = jax.eval_shape(lambda: state_lib.create(model_fn(), optimizer)[1])
        opt_shard = optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            abstract.opt_state,
            p_shard,
            transform_non_params=lambda _: self.replicated,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        r = self.replicated
        self.state_shardings = state_lib.TrainState(r, p_shard, opt_shard, r, r)
        return graphdef, self.abstract(abstract)

    def abstract(self, state: Any) -> Any:
        """ShapeDtypeStructs with shardings, the target for a checkpoint restore."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state,
            self.state_shardings,
        )

    def batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from this process's rows (contiguous, in process order)."""
        out = {}
        for k, v in host.items():
            sharding = batch_sharding(self.mesh, v.ndim)
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
        return out

    def jit_train_step(self, fn: Callable, state: Any) -> Callable:
        jitted = jax.jit(
            fn,
            in_shardings=(self.state_shardings, None, None),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        return _InMesh(jitted, self.mesh)

    def jit(self, fn: Callable, **kw) -> Callable:
        return _InMesh(jax.jit(fn, **kw), self.mesh)

    def pod_summary(self, exp, step_fn, state, key, data, timed_s, timed_steps) -> dict[str, Any]:
        """Measured step time here and the cost model's projection for the configured slice."""
        measured = 1000 * timed_s / timed_steps if timed_steps else None
        out = {
            "topology": exp.pod.topology,
            "slice": exp.pod.slice or "1",
            "devices": int(self.mesh.size),
            "processes": jax.process_count(),
            "mesh": {k: int(v) for k, v in self.mesh.shape.items()},
            "measured_step_ms": measured,
        }
        from moe.pod.plan import project_train_step

        batch = self.batch(data.batcher.process_batch(0, jax.process_index(), jax.process_count()))
        out.update(project_train_step(exp, step_fn.lower(state, batch, key).compile()))
        return out

    def abstract_batch(self, exp: Experiment) -> dict[str, jax.ShapeDtypeStruct]:
        b, ls, lt = exp.train.batch_size, exp.model.max_source_length, exp.model.max_target_length
        shapes = {"src": (b, ls), "tgt_in": (b, lt), "tgt_out": (b, lt), "task": (b,)}
        return {
            k: jax.ShapeDtypeStruct(v, np.int32, sharding=batch_sharding(self.mesh, len(v)))
            for k, v in shapes.items()
        }


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
