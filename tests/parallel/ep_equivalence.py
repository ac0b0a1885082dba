"""Run by test_expert_parallel.py in a subprocess with 8 virtual CPU devices.

Compares ``moe_exchange`` on meshes (data, expert[, model]) with a slow
reference that routes each device's group of rows alone on one device (a Python loop over
groups), for token choice and expert choice: outputs, aux losses and gradients. Prints one JSON
line: {case: max abs error}.
"""

from moe.pod.simulate import ensure_virtual_devices

ensure_virtual_devices(8)

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe.layers.experts import apply_experts  # noqa: E402
from moe.parallel.expert_parallel import moe_exchange, psum_model  # noqa: E402
from moe.parallel.mesh import build_mesh  # noqa: E402
from moe.routing import expert_choice, token_choice  # noqa: E402
from moe.routing.dispatch import combine, dispatch  # noqa: E402

B, S, D_MODEL, D_FF, E, K = 16, 4, 8, 16, 8, 2


def router(kind, w_gate, key=None):
    def route(x_td, extras, k):
        logits = x_td @ w_gate  # [T, E]
        cap = math.ceil(1.25 * K * x_td.shape[0] / E)
        if kind == "expert_choice":
            return expert_choice.route(logits, capacity=cap)
        random = kind == "random"
        return token_choice.top_k(
            logits,
            k=K,
            capacity=cap,
            second_expert_policy="random" if random else "all",
            key=k if random else None,
        )

    return route


def experts_fn(p, buf, key):
    return apply_experts(p["w_in"], p["b_in"], p["w_out"], p["b_out"], buf)


def experts_tp(p, buf, key):
    """Hidden dim split over `model`: partial sums, psum, then the output bias once."""
    y = apply_experts(p["w_in"], p["b_in"], p["w_out"], jnp.zeros_like(p["b_out"]), buf)
    return psum_model(y) + p["b_out"][:, None, :]


def reference(x, w_gate, params, kind, groups, key):
    """One device, group by group: the obvious loop."""
    route = router(kind, w_gate)
    rows = B // groups
    ys, aux, z = [], [], []
    for g in range(groups):
        x_td = x[g * rows : (g + 1) * rows].reshape(-1, D_MODEL)  # [T_l, d]
        k = jax.random.fold_in(key, g)
        r = route(x_td, None, k)
        y = experts_fn(params, dispatch(x_td, r.slot_token), None)  # [E, C, d]
        ys.append(combine(y, r.slot_token, r.slot_weight, x_td.shape[0]).reshape(rows, S, -1))
        aux.append(r.aux_loss)
        z.append(r.z_loss)
    return jnp.concatenate(ys), jnp.mean(jnp.stack(aux)), jnp.mean(jnp.stack(z))


def sharded(x, w_gate, params, kind, mesh, key):
    specs = {"w_in": P("expert"), "b_in": P("expert"), "w_out": P("expert"), "b_out": P("expert")}
    tp = mesh.shape.get("model", 1) > 1
    if tp:
        specs.update(w_in=P("expert", None, "model"), b_in=P("expert", "model"))
        specs.update(w_out=P("expert", "model"))
    y, aux = moe_exchange(
        x,
        mesh=mesh,
        route=router(kind, w_gate),
        experts=experts_tp if tp else experts_fn,
        expert_params=params,
        expert_specs=specs,
        key=key,
    )
    return y, aux.aux_loss, aux.z_loss


def value_and_grads(fn, r):
    """One jitted program: the layer's output and the gradients of a scalar loss."""

    def f(x, w_gate, params):
        y, aux, z = fn(x, w_gate, params)
        return jnp.sum(y * r) + 0.1 * aux + 0.01 * z, (y, aux, z)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


# The block-level test (block_equivalence.py) covers every mesh shape; these check the pure
# exchange function on its own, with a route/experts pair written out here.
MESHES = {"token_choice": ("1x8",), "expert_choice": ("4x2",), "random": ("2x4",)}
MESHES["model"] = ("2x2x2",)


def max_err(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main():
    ks = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(ks[0], (B, S, D_MODEL))
    w_gate = jax.random.normal(ks[1], (D_MODEL, E))
    params = {
        "w_in": jax.random.normal(ks[2], (E, D_MODEL, D_FF)) * 0.3,
        "b_in": jax.random.normal(ks[3], (E, D_FF)) * 0.1,
        "w_out": jax.random.normal(ks[4], (E, D_FF, D_MODEL)) * 0.3,
        "b_out": jax.random.normal(ks[5], (E, D_MODEL)) * 0.1,
    }
    r = jax.random.normal(ks[6], (B, S, D_MODEL))
    key = ks[7]
    out, refs = {}, {}
    for kind in sys.argv[1:] or list(MESHES):
        route = "token_choice" if kind == "model" else kind
        for shape in MESHES[kind]:
            sizes = dict(zip(("data", "expert", "model"), map(int, shape.split("x"))))
            groups = sizes["data"] * sizes["expert"]
            if (route, groups) not in refs:
                ref = lambda x, w, p, g=groups, k=route: reference(x, w, p, k, g, key)  # noqa: E731
                refs[route, groups] = value_and_grads(ref, r)(x, w_gate, params)
            (_, want), g_want = refs[route, groups]
            mesh = build_mesh(sizes)
            fn = lambda x, w, p, m=mesh, k=route: sharded(x, w, p, k, m, key)  # noqa: E731
            (_, got), g_got = value_and_grads(fn, r)(x, w_gate, params)
            out[f"{kind}/{shape}"] = {
                "forward": max_err(want, got),
                "grad": max_err(g_want, g_got),
                "scale": float(jnp.max(jnp.abs(want[0]))),
                "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_want)),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
