"""Parameters with logical axis names.

Every parameter of the model is made here: ``nnx.Param`` with its logical axes as
``out_sharding`` metadata (read by ``moe.parallel.mesh.param_specs``) and ``eager_sharding``
off, so creating a module never shards anything by itself (Flax would otherwise shard on
creation when ``flax_always_shard_variable`` is set, a process-wide flag).
"""

from __future__ import annotations

import jax
from flax import nnx


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """``nnx.Param(value)`` whose dims carry the logical ``axes`` (``('expert', 'embed',
    'mlp')``)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)
