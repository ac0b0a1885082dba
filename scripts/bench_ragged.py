"""Dropless experts two ways, on whatever backend JAX finds: the worst-case buffers the MoE block
runs today, and a grouped matmul with ``jax.lax.ragged_dot`` (issue 10, item 5).

    .venv/bin/python scripts/bench_ragged.py [--json FILE] [--runs 5]

Per case (``T`` tokens routed together, ``E`` experts of width ``f``, top-``k``, model width
``d``; random top-k choices), forward of one expert layer ``W_out gelu(W_in x + b_in) + b_out``:

- ``buffers_ms``: ``moe.layers.experts.apply_experts`` on ``[E, T, d]`` buffers (capacity ``T``:
  an expert receives a token at most once, so nothing can be dropped; ``E * T`` rows computed);
- ``ragged_ms``: the ``T * k`` chosen (token, expert) rows sorted by expert, both matmuls as
  ``jax.lax.ragged_dot`` over the group sizes (``T * k`` rows computed);
- ``max_abs_err``: ragged rows against the same rows of the dense every-expert reference.

Times are the fastest of ``--runs`` calls after one warm-up (other jobs share this host). The
result decides whether the block uses ``ragged_dot`` on a backend (docs/experiments_routing.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe.layers.experts import apply_experts  # noqa: E402

CASES = [  # T, E, k, d, f
    (256, 8, 2, 128, 512),
    (1024, 8, 2, 128, 512),
    (256, 32, 8, 128, 128),
    (1024, 32, 8, 128, 128),
]


def ragged_experts(w_in, b_in, w_out, b_out, x_td, experts_tk):
    """``[T * k, d]`` outputs of each chosen expert on its token, rows sorted by expert."""
    num_tokens, k = experts_tk.shape
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    rows = x_td[order // k]  # [T*k, d]
    sizes = jnp.bincount(flat, length=w_in.shape[0]).astype(jnp.int32)  # [E]
    expert = flat[order]
    h = jax.lax.ragged_dot(rows, w_in, sizes) + b_in[expert]  # [T*k, f]
    return jax.lax.ragged_dot(jax.nn.gelu(h), w_out, sizes) + b_out[expert], order


def best_ms(fn, args, runs):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def case(num_tokens, num_experts, k, d, f, runs):
    ks = jax.random.split(jax.random.key(0), 6)
    w_in = jax.random.normal(ks[0], (num_experts, d, f)) / d**0.5
    w_out = jax.random.normal(ks[1], (num_experts, f, d)) / f**0.5
    b_in = jax.random.normal(ks[2], (num_experts, f))
    b_out = jax.random.normal(ks[3], (num_experts, d))
    x = jax.random.normal(ks[4], (num_tokens, d))
    scores = jax.random.normal(ks[5], (num_tokens, num_experts))
    experts_tk = jax.lax.top_k(scores, k)[1]

    buffers = jax.jit(
        lambda *a: apply_experts(*a[:4], jnp.broadcast_to(a[4], (num_experts, *a[4].shape)))
    )
    ragged = jax.jit(ragged_experts)
    dense = buffers(w_in, b_in, w_out, b_out, x)  # [E, T, d]: every expert on every token
    got, order = ragged(w_in, b_in, w_out, b_out, x, experts_tk)
    flat = experts_tk.reshape(-1)[order]
    want = dense[flat, order // k]
    return {
        "T": num_tokens,
        "E": num_experts,
        "k": k,
        "d": d,
        "f": f,
        "backend": jax.default_backend(),
        "buffers_ms": best_ms(buffers, (w_in, b_in, w_out, b_out, x), runs),
        "ragged_ms": best_ms(ragged, (w_in, b_in, w_out, b_out, x, experts_tk), runs),
        "max_abs_err": float(jnp.max(jnp.abs(got - want))),
        "scale": float(jnp.max(jnp.abs(want))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = [case(*c, args.runs) for c in CASES]
    print("| backend | T | E | k | d | f | buffers ms | ragged_dot ms | ragged/buffers | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ragged_ms"] / r["buffers_ms"]
        print(
            f"| {r['backend']} | {r['T']} | {r['E']} | {r['k']} | {r['d']} | {r['f']} | "
            f"{r['buffers_ms']:.2f} | {r['ragged_ms']:.2f} | {ratio:.2f} | {r['max_abs_err']:.1e} |"
        )
    print(json.dumps(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
