"""Benchmark one MoE block against a dense FFN and GShard's one-hot einsum dispatch.

    .venv/bin/python scripts/bench_moe.py --json bench_moe.json      # the issue's setting
    .venv/bin/python scripts/bench_moe.py --quick                    # smoke run (seconds)

Forward + backward (gradients with respect to every parameter and the input), jitted, float32,
on the default JAX device (CPU here). Per expert count E, three rows timed in the same process:

- ``moe_ms``: ``moe.layers.moe.MoeBlock`` (token-choice top-k, capacity factor cf): router,
  index gather into ``[E, C, d]`` buffers, batched expert matmuls, weighted scatter-add combine;
- ``dense_ms``: ``moe.layers.dense.DenseFFN`` with hidden width ``k * d_ff`` (the same
  activated FLOPs per token as top-k MoE, minus the capacity slack);
- ``einsum_ms``: the same router and experts with GShard Algorithm 2's dispatch (papers §2.4):
  a ``[T, E, C]`` combine tensor from top-k gating with cumsum positions, then
  ``einsum('tec,td->ecd')`` and ``einsum('tec,ecd->td')``.

Reported: median of ``--runs`` timed calls after ``--warmup`` untimed ones (also the minimum,
``*_min_ms``); the three rows' calls are interleaved so that load changes hit them alike. The
loss is ``<y, ct> + 0.01 aux + 0.001 z`` with a fixed random cotangent ``ct``, so the backward
pass is the real one. Output: a table on stdout and, with ``--json FILE``,
``{"cases": [{"experts", "tokens", "moe_ms", "dense_ms", "einsum_ms"}, ...], "setting": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe.layers.dense import DenseFFN
from moe.layers.experts import apply_experts
from moe.layers.moe import MoeBlock, MoeSpec
from moe.routing import losses, token_choice


def time_interleaved(calls: dict, *, warmup: int, runs: int) -> dict:
    """Wall times in ms of each ``name: (fn, args)``, after ``warmup`` untimed calls each.

    The timed calls go round-robin (moe, dense, einsum, moe, ...), so a change in machine load
    during the measurement hits every row alike and the ratios stay meaningful. Returns
    ``{name: [ms, ...]}``.
    """
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in calls}
    for _ in range(runs):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def einsum_moe(params, x_td, *, k: int, capacity: int, activation: str):
    """GShard Algorithm 2 (one group of T tokens): one-hot ``[T, E, C]`` dispatch and combine.

    Top-k gating as in Algorithm 1 (renormalised gates; all first choices before any second
    choice, positions by an exclusive cumsum; over-capacity choices dropped). Returns
    ``(y [T, d], aux_loss, z_loss)``.
    """
    router, experts = params["router"], params["experts"]
    logits = jnp.dot(x_td, router["w_gate"], precision=jax.lax.Precision.HIGHEST)  # [T, E]
    num_tokens, num_experts = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, top_experts = jax.lax.top_k(probs, k)  # [T, k]
    gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    mask = jax.nn.one_hot(top_experts.T, num_experts, dtype=jnp.int32)  # [k, T, E]
    flat = mask.reshape(k * num_tokens, num_experts)
    position = (jnp.cumsum(flat, axis=0) - flat).reshape(k, num_tokens, num_experts)
    position = jnp.sum(position * mask, axis=-1)  # [k, T]
    slot = jax.nn.one_hot(position, capacity, dtype=jnp.float32)  # [k, T, C], 0 when >= C
    combine_tec = jnp.einsum("kte,ktc,tk->tec", mask.astype(jnp.float32), slot, gates)
    dispatch_tec = (combine_tec > 0).astype(x_td.dtype)  # [T, E, C]
    buffers = jnp.einsum("tec,td->ecd", dispatch_tec, x_td)  # [E, C, d]
    y_ecd = apply_experts(
        experts["w_in"],
        experts["b_in"],
        experts["w_out"],
        experts["b_out"],
        buffers,
        activation=activation,
    )
    y_td = jnp.einsum("tec,ecd->td", combine_tec, y_ecd)  # [T, d]
    fraction = jnp.mean(jax.nn.one_hot(top_experts, num_experts), axis=(0, 1))
    valid = jnp.ones((num_tokens,), bool)
    aux = losses.switch_balance_loss(probs, jax.lax.stop_gradient(fraction), valid)
    return y_td, aux, losses.router_z_loss(logits, valid)


def _grad_step(apply):
    """jit(grad) of ``<y, ct> + 0.01 aux + 0.001 z`` w.r.t. (params, x)."""

    def loss(params, x, ct):
        y, aux, z = apply(params, x)
        return jnp.vdot(y, ct) + 0.01 * aux + 0.001 * z

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def build_calls(experts: int, args) -> dict:
    """The jitted forward+backward steps for one expert count: ``{row: (fn, args)}``."""
    tokens, d, f, k = args.tokens, args.d_model, args.d_ff, args.top_k
    kx, kc = jax.random.split(jax.random.key(args.seed))
    x = jax.random.normal(kx, (1, tokens, d), jnp.float32)
    ct = jax.random.normal(kc, (1, tokens, d), jnp.float32)
    spec = MoeSpec(num_experts=experts, top_k=k, capacity_factor_train=args.capacity_factor)
    block = MoeBlock(d, f, spec, causal=False, rngs=nnx.Rngs(args.seed))
    graph, params = nnx.split(block)

    def moe_apply(p, xx):
        y, aux = nnx.merge(graph, p)(xx, train=True)
        return y, aux.aux_loss, aux.z_loss

    dense = DenseFFN(d, k * f, rngs=nnx.Rngs(args.seed))
    dgraph, dparams = nnx.split(dense)
    dense_apply = lambda p, xx: (nnx.merge(dgraph, p)(xx, train=True), 0.0, 0.0)

    capacity = spec.capacity(tokens, train=True)
    raw = nnx.to_pure_dict(params)
    einsum_apply = lambda p, xx: _reshape_out(
        einsum_moe(p, xx[0], k=k, capacity=capacity, activation=spec.activation)
    )
    calls = {
        "moe": (_grad_step(moe_apply), (params, x, ct)),
        "dense": (_grad_step(dense_apply), (dparams, x, ct)),
    }
    if not args.skip_einsum:
        calls["einsum"] = (_grad_step(einsum_apply), (raw, x, ct))
    return calls


def bench(args) -> list[dict]:
    """One row per expert count; every timed call of every row is interleaved (so is the
    E=128 vs E=8 comparison)."""
    calls = {}
    for experts in args.experts:
        for name, call in build_calls(experts, args).items():
            calls[experts, name] = call
    times = time_interleaved(calls, warmup=args.warmup, runs=args.runs)
    rows = []
    for experts in args.experts:
        capacity = token_choice.capacity(args.tokens, experts, args.top_k, args.capacity_factor)
        row = {"experts": experts, "tokens": args.tokens, "capacity": capacity}
        names = [name for e, name in times if e == experts]
        row.update({f"{n}_ms": statistics.median(times[experts, n]) for n in names})
        row.update({f"{n}_min_ms": min(times[experts, n]) for n in names})
        rows.append(row)
    return rows


def _reshape_out(out):
    y, aux, z = out
    return y[None], aux, z


def print_table(rows: list[dict]) -> None:
    """Medians, and the ratios the issue sets targets for (from medians; from minima)."""
    nan = float("nan")
    print(
        f"{'E':>5} {'T':>6} {'C':>6} {'moe ms':>9} {'dense ms':>9} {'einsum ms':>10} "
        f"{'moe/dense':>9} {'(min)':>6} {'moe/einsum':>10} {'(min)':>6}"
    )
    for r in rows:
        ein, ein_min = r.get("einsum_ms", nan), r.get("einsum_min_ms", nan)
        print(
            f"{r['experts']:>5} {r['tokens']:>6} {r['capacity']:>6} {r['moe_ms']:>9.1f} "
            f"{r['dense_ms']:>9.1f} {ein:>10.1f} {r['moe_ms'] / r['dense_ms']:>9.2f} "
            f"{r['moe_min_ms'] / r['dense_min_ms']:>6.2f} {r['moe_ms'] / ein:>10.3f} "
            f"{r['moe_min_ms'] / ein_min:>6.3f}"
        )
    first, last = rows[0], rows[-1]
    print(
        f"moe(E={last['experts']}) / moe(E={first['experts']}) = "
        f"{last['moe_ms'] / first['moe_ms']:.2f} (min: "
        f"{last['moe_min_ms'] / first['moe_min_ms']:.2f})"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="T = batch * sequence tokens")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs (the first compiles)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-einsum", action="store_true", help="time only moe and dense")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (T=256, d=32, E=4,8)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.d_ff, args.experts = 256, 32, 64, [4, 8]
        args.runs, args.warmup = 2, 1
    return args


def preload_tcmalloc() -> None:
    """Re-run this script with tcmalloc preloaded, as ``moe`` runs itself (moe.cli): with
    glibc's malloc every call page-faults XLA's freshly allocated buffers back in, which costs
    the MoE block (more, smaller buffers) more than the dense layer. MOE_NO_TCMALLOC=1: glibc."""
    from moe.cli import TCMALLOC

    lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
    env = os.environ
    if lib is None or env.get("MOE_NO_TCMALLOC") or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return
    preload = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], {**env, "LD_PRELOAD": preload})


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None:
        preload_tcmalloc()
    rows = bench(args)
    print_table(rows)
    if args.json:
        setting = {
            k: getattr(args, k) for k in ("tokens", "d_model", "d_ff", "top_k", "capacity_factor")
        }
        setting.update(
            runs=args.runs,
            warmup=args.warmup,
            device=str(jax.devices()[0]),
            dtype="float32",
            cpu_count=os.cpu_count(),
            load_average=os.getloadavg(),  # other work on the machine skews wall times
            allocator="tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc",
        )
        with open(args.json, "w") as fh:
            json.dump({"cases": rows, "setting": setting}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
