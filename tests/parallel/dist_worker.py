"""Run by test_distributed.py: under ``mpirun -np 2`` (2 processes x 4 virtual devices) or alone
(1 process x 8 devices). Builds a (data=2, expert=4) mesh, assembles the global batch from each
process's rows, runs the expert exchange, and prints a checksum of the output. ``die`` makes
rank 1 exit with status 3 while rank 0 waits in a collective.
"""

import os
import sys

from moe.parallel.distributed import initialize, launched_ranks
from moe.pod.simulate import ensure_virtual_devices

RANKS = launched_ranks(os.environ)
ensure_virtual_devices(8 // RANKS)
initialize(RANKS)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe.parallel.expert_parallel import moe_exchange  # noqa: E402
from moe.parallel.mesh import batch_sharding, build_mesh  # noqa: E402
from moe.routing import token_choice  # noqa: E402

B, S, D, E = 16, 4, 8, 8


def main(mode: str) -> None:
    mesh = build_mesh({"data": 2, "expert": 4})
    rng = np.random.default_rng(0)
    x_all = rng.standard_normal((B, S, D)).astype(np.float32)
    w_gate = rng.standard_normal((D, E)).astype(np.float32)
    w_exp = rng.standard_normal((E, D, D)).astype(np.float32) * 0.3
    rows = B // jax.process_count()
    mine = x_all[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    x = jax.make_array_from_process_local_data(batch_sharding(mesh, 3), mine)
    w = jax.device_put(w_exp, NamedSharding(mesh, P("expert")))

    def layer(x, w):
        y, aux = moe_exchange(
            x,
            mesh=mesh,
            route=lambda x_td, _, __: token_choice.top_k(x_td @ w_gate, k=2, capacity=3),
            experts=lambda p, buf, _: jnp.einsum("ecd,edf->ecf", buf, p),
            expert_params=w,
            expert_specs=P("expert"),
        )
        return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), aux.aux_loss

    replicated = NamedSharding(mesh, P())
    step = jax.jit(layer, out_shardings=(replicated, replicated))
    checksum, aux = step(x, w)
    print(f"rank {jax.process_index()} checksum {float(checksum):.6f} aux {float(aux):.6f}")
    if mode == "die":
        if jax.process_index() == 1:
            sys.stdout.flush()
            os._exit(3)
        for i in range(10_000):  # rank 0 waits on its dead peer in a collective
            step(x + i, w)[0].block_until_ready()
        print("rank 0 finished a loop it should not have finished", flush=True)
    if jax.process_index() == 0:
        print(f"processes {jax.process_count()} devices {jax.device_count()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ok")
