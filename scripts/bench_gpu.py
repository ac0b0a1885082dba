"""The MoE block and a whole train step on one accelerator (bf16), as model FLOP utilisation.

    python scripts/bench_gpu.py --json gpu.json          # on a GPU machine (device tool)
    python scripts/bench_gpu.py --quick                  # smoke run on any device

Two measurements, each steady state (compile excluded; median of timed calls after warm-up):

1. the MoE block forward + backward (``moe.layers.moe.MoeBlock``, top-2, capacity factor 1.25,
   bf16 experts, float32 router) at E = 8 / 32 / 128 experts against the FLOP-matched dense FFN
   (hidden width ``k * d_ff``), calls interleaved;
2. the experiment's jitted train step (``moe.training``: packed batches, Adam, the MoE layers)
   for a GPU-sized model in bf16 on one device.

MFU = FLOPs / time / peak: the block's FLOPs are counted from its shapes (6 x the forward
matmuls, router and capacity slack included), the train step's from XLA's cost analysis of the
compiled program; ``--peak`` is the device's dense bf16 peak (H200: 989 TFLOP/s by the data
sheet; a measured 8192^3 bf16 matmul reaches about 790 here, also printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import config as cfg
from moe.layers.dense import DenseFFN
from moe.layers.moe import MoeBlock, MoeSpec
from moe.pod.hlo import program_cost
from moe.routing.token_choice import capacity as expert_capacity
from moe.training.sharding import Placement
from moe.training.step import make_train_step


def timed(fn, *args, warmup=3, runs=10) -> float:
    """Median seconds of ``fn(*args)`` after ``warmup`` untimed calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    return 2 * n**3 / timed(jax.jit(lambda x: x @ x), a)


def _grad(module_fn, x, ct):
    graph, state = nnx.split(module_fn())

    def loss(state, x):
        y = nnx.merge(graph, state)(x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y.astype(jnp.float32) * ct)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def block_rows(args) -> list[dict]:
    t, d, f, k = args.tokens, args.d_model, args.d_ff, 2
    x = jax.random.normal(jax.random.key(0), (t // 512, 512, d), jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    rows = []
    dense, dstate = _grad(
        lambda: _Train(DenseFFN(d, k * f, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))), x, ct
    )
    for e in args.experts:
        spec = MoeSpec(num_experts=e, top_k=k, capacity_factor_train=1.25)
        moe, mstate = _grad(
            lambda spec=spec: _Train(MoeBlock(d, f, spec, causal=False, dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0))),
            x, ct,
        )  # fmt: skip
        ms, ds = [], []
        for _ in range(args.repeats):  # interleaved
            ms.append(timed(moe, mstate, x))
            ds.append(timed(dense, dstate, x))
        cap = expert_capacity(t, e, k, 1.25)
        flops = 6 * (2 * e * cap * d * f) + 6 * t * d * e  # experts + router, fwd + bwd
        dense_flops = 6 * (2 * t * d * k * f)
        m, dn = statistics.median(ms), statistics.median(ds)
        rows.append({
            "experts": e, "tokens": t, "moe_ms": 1e3 * m, "dense_ms": 1e3 * dn,
            "moe_over_dense": m / dn, "moe_mfu": flops / m / args.peak,
            "dense_mfu": dense_flops / dn / args.peak,
        })  # fmt: skip
        print(f"block E={e:<4} moe {1e3 * m:8.2f} ms  dense {1e3 * dn:8.2f} ms  "
              f"ratio {m / dn:5.2f}  MFU moe {rows[-1]['moe_mfu']:.3f} dense "
              f"{rows[-1]['dense_mfu']:.3f}", flush=True)  # fmt: skip
    return rows


class _Train(nnx.Module):
    """A block called in training mode (the training capacity factor; no dropout, no rngs)."""

    def __init__(self, block):
        self.block = block

    def __call__(self, x):
        return self.block(x, train=True)


def train_step_row(args) -> dict:
    exp = cfg.from_dict({
        "name": "gpu",
        "model": {"d_model": args.model_dim, "num_heads": args.model_dim // 64,
                  "encoder_layers": args.layers, "decoder_layers": args.layers,
                  "d_ff": 4 * args.model_dim, "dropout": 0.0, "vocab_size": 32000,
                  "max_source_length": args.length, "max_target_length": args.length},
        "moe": {"num_experts": 8, "every": 2, "top_k": 2},
        "tasks": [{"name": "t", "kind": "translate", "source": "x"}],
        "train": {"batch_size": args.batch, "precision": "bfloat16"},
    })  # fmt: skip
    placement = Placement.for_experiment(exp)
    state = placement.init_state()
    step = placement.jit_train_step(make_train_step(exp, placement.graphdef, placement.optimizer))
    b, length = args.batch, args.length
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 32000, (b, length), dtype=np.int32)
    ones = np.ones((b, length), np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    host = {"src": tokens, "tgt_in": tokens, "tgt_out": tokens, "src_segment": ones,
            "tgt_segment": ones, "src_position": pos, "tgt_position": pos,
            "src_task": 0 * ones, "tgt_task": 0 * ones}  # fmt: skip
    batch, key = placement.batch(host), jax.random.key(0)
    flops = program_cost(step.lower(state, batch, key).compile()).flops
    for _ in range(3):  # warm-up (the first compiles)
        state, m = step(state, batch, key)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    row = {"params": int(params), "batch": b, "length": length, "step_ms": 1e3 * s,
           "flops_per_step": flops, "mfu": flops / s / args.peak,
           "tokens_per_s": 2 * b * length / s}  # fmt: skip
    print(f"train step: {params / 1e6:.0f}M params, {1e3 * s:.1f} ms, {flops / 1e12:.2f} TFLOP, "
          f"MFU {row['mfu']:.3f}, {row['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s of the device")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.d_model, a.d_ff, a.experts, a.repeats = 1024, 64, 128, [4, 8], 1
        a.model_dim, a.layers, a.batch, a.length, a.steps = 64, 2, 8, 16, 3
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    rate = matmul_rate(2048 if a.quick else 8192)
    print(f"bf16 matmul: {rate / 1e12:.1f} TFLOP/s ({rate / a.peak:.2f} of the peak)", flush=True)
    out = {"device": jax.devices()[0].device_kind, "matmul_flops": rate, "peak": a.peak,
           "block": block_rows(a), "train_step": train_step_row(a)}  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
