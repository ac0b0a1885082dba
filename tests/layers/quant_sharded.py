"""Run by test_quant.py in a subprocess with 4 virtual CPU devices.

A quantised ``MoeBlock`` with per-device routing groups under a (data 1, expert 4) mesh (the
all-to-all exchange, scales passed into ``shard_map``) against the same weights in a
whole-batch block called group by group on one device. Prints one JSON line.
"""

from moe.pod.simulate import ensure_virtual_devices

ensure_virtual_devices(4)

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe.layers.moe import MoeBlock, MoeSpec  # noqa: E402
from moe.parallel.mesh import build_mesh  # noqa: E402

B, S, D, F, E, GROUPS = 8, 4, 8, 16, 8, 4


def main():
    out = {}
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    mesh = build_mesh({"data": 1, "expert": GROUPS})
    for bits in (8, 4):
        make = lambda groups, bits=bits: MoeBlock(
            D, F, MoeSpec(E, weight_bits=bits, routing_groups=groups), causal=False,
            rngs=nnx.Rngs(0),
        )  # fmt: skip
        reference = make("batch")
        rows = B // GROUPS
        want = jnp.concatenate(
            [reference(x[g * rows : (g + 1) * rows], train=False)[0] for g in range(GROUPS)]
        )
        graph, state = nnx.split(make("device"))
        with jax.set_mesh(mesh):
            got = jax.jit(lambda s, x, graph=graph: nnx.merge(graph, s)(x, train=False)[0])(
                state, x
            )
        out[bits] = {
            "forward": float(jnp.max(jnp.abs(want - got))),
            "scale": float(jnp.max(jnp.abs(want))),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
