"""Run by test_expert_parallel.py in a subprocess with 8 virtual CPU devices.

``MoeBlock`` with per-device routing groups called under ``jax.set_mesh`` (the all-to-all
exchange) against the same weights in a whole-batch block called on one device, group by group
(a Python loop over the ``data * expert`` row groups); outputs, aux losses and gradients.
Prints one JSON line.
"""

from moe.pod.simulate import ensure_virtual_devices

ensure_virtual_devices(8)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe.layers.moe import MoeBlock, MoeSpec  # noqa: E402
from moe.parallel.mesh import build_mesh  # noqa: E402
from moe.pod.hlo import parse_collectives  # noqa: E402
from moe.routing.balance import bias_update  # noqa: E402

B, S, D, F, E = 16, 4, 8, 16, 8
DEEPSEEK = {"gate": "sigmoid", "selection_bias": True, "device_limit": 2, "top_k": 3}
CASES = {  # name: (mesh, spec options, train, with masks)
    "token_choice/8x1": ("8x1", {}, False, False),
    "token_choice/4x2": ("4x2", {}, False, False),
    "token_choice/2x4": ("2x4", {}, False, False),
    "token_choice/1x8": ("1x8", {}, False, False),
    "expert_choice/2x4": ("2x4", {"router": "expert_choice"}, False, False),
    "random_jitter_train/2x4": (
        "2x4",
        {"second_expert_policy": "random", "jitter": 0.01},
        True,
        False,
    ),
    "masks/1x8": ("1x8", {}, False, True),
    "model/2x2x2": ("2x2x2", {}, False, False),
    # DeepSeek routing: sigmoid gates, a selection bias, at most 2 of the 4 expert devices
    "deepseek/2x4": ("2x4", DEEPSEEK, False, False),
    "deepseek_masks/1x8": ("1x8", {**DEEPSEEK, "device_limit": 4}, False, True),
    # dropless under expert parallelism, with a shared expert
    "dropless_shared/4x2": (
        "4x2",
        {"capacity_factor_train": 0.0, "num_shared_experts": 1},
        True,
        False,
    ),
}
BIAS_RATE = 1e-3


def block_for(options, groups, expert_devices):
    kw = dict(num_experts=E, top_k=2, capacity_factor_train=1.0, routing_groups=groups)
    # the reference counts devices (device limit, fan-out) as the mesh's expert axis does
    spec = MoeSpec(**{**kw, **options}, expert_devices=expert_devices)
    block = MoeBlock(D, F, spec, causal=False, rngs=nnx.Rngs(0))
    block.router.w_gate[...] = jax.random.normal(jax.random.key(7), block.router.w_gate.shape)
    block.experts.b_out[...] = jax.random.normal(jax.random.key(9), block.experts.b_out.shape)
    if block.router.bias is not None:
        block.router.bias[...] = 0.3 * jax.random.normal(jax.random.key(13), (E,))
    return block


def arrays(with_masks):
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], (B, S, D))
    if not with_masks:
        return x, {}
    masks = {
        "token_mask": jax.random.uniform(ks[1], (B, S)) > 0.2,
        "expert_mask": jax.random.uniform(ks[2], (B, S, E)) > 0.3,
        "router_bias": 0.5 * jax.random.normal(ks[3], (B, S, D)),
    }
    return x, masks


def loss_fn(run, r):
    def f(state, x, masks, key):
        y, aux = run(state, x, masks, key)
        return jnp.sum(y * r) + 0.1 * aux.aux_loss + 0.01 * aux.z_loss, (y, aux)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def bias_update_error(graph, state, x, masks, groups, rows, aux_sharded):
    """Loss-free balancing under expert parallelism: the bias update from the sharded layer's
    load (a mean over the groups) against the update from the loads of the groups summed one by
    one on a single device (Wang et al. 2024: the step's whole load). None without a bias."""
    block = nnx.merge(graph, state)
    if block.router.bias is None:
        return None
    total = 0.0
    for g in range(groups):
        part = {k: v[g * rows : (g + 1) * rows] for k, v in masks.items()}
        _, a = block(x[g * rows : (g + 1) * rows], train=False, **part)
        total = total + a.stats["choices_per_expert"]
    bias = block.router.bias[...]
    want = bias_update(bias, total, BIAS_RATE)
    got = bias_update(bias, aux_sharded.stats["choices_per_expert"], BIAS_RATE)
    assert float(jnp.max(jnp.abs(want - bias))) > 0  # the update does something
    return float(jnp.max(jnp.abs(want - got)))


def main():
    out = {}
    r = jax.random.normal(jax.random.key(3), (B, S, D))
    key = jax.random.key(5)
    for name in sys.argv[1:] or list(CASES):
        shape, options, train, with_masks = CASES[name]
        sizes = dict(zip(("data", "expert", "model"), map(int, shape.split("x"))))
        mesh = build_mesh(sizes)
        ep = sizes["expert"]
        graph, state = nnx.split(block_for(options, "batch", ep))  # the reference, group by group
        graph_sharded, _ = nnx.split(block_for(options, "device", ep))
        groups = sizes["data"] * sizes["expert"]
        rows = B // groups
        x, masks = arrays(with_masks)

        def reference(state, x, masks, key, groups=groups, rows=rows, train=train, graph=graph):
            block, ys, aux = nnx.merge(graph, state), [], []
            base = nnx.Rngs(router=key).router()  # what the block draws once
            for g in range(groups):
                part = {k: v[g * rows : (g + 1) * rows] for k, v in masks.items()}
                rngs = nnx.Rngs(router=jax.random.fold_in(base, g)) if train else None
                y, a = block(x[g * rows : (g + 1) * rows], train=train, rngs=rngs, **part)
                ys.append(y)
                aux.append(a)
            mean = lambda *v: jnp.mean(jnp.stack(v), axis=0)  # noqa: E731
            return jnp.concatenate(ys), jax.tree.map(mean, *aux)

        def sharded(state, x, masks, key, train=train, graph=graph_sharded):  # under set_mesh
            rngs = nnx.Rngs(router=key) if train else None
            return nnx.merge(graph, state)(x, train=train, rngs=rngs, **masks)

        (_, (y_want, a_want)), g_want = loss_fn(reference, r)(state, x, masks, key)
        with jax.set_mesh(mesh):
            step = loss_fn(sharded, r)
            (_, (y_got, a_got)), g_got = step(state, x, masks, key)
            hlo = step.lower(state, x, masks, key).compile().as_text()
        err = lambda a, b: max(  # noqa: E731
            float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )
        out[name] = {
            "forward": err(y_want, y_got),
            "aux": err((a_want.aux_loss, a_want.z_loss), (a_got.aux_loss, a_got.z_loss)),
            "stats": err(a_want.stats, a_got.stats),
            "grad": err(g_want, g_got),
            "all_to_alls": len([c for c in parse_collectives(hlo, 8) if c.kind == "all-to-all"]),
            "dropped": float(a_got.stats["dropped_fraction"]),
            "fanout": float(a_got.stats.get("device_fanout", jnp.nan)),  # token choice only
            "device_limit": options.get("device_limit", 0),
            "bias_update": bias_update_error(graph, state, x, masks, groups, rows, a_got),
            "scale": float(jnp.max(jnp.abs(y_want))),
            "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_want)),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
