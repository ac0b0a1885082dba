"""Serving benchmark: the float MoE, its int8 twin, a distilled dense student and a dense model
of the student's shape trained from scratch, side by side.

    .venv/bin/python scripts/bench_serving.py --float runs/quickstart \\
        --int8 runs/quickstart-int8 --student runs/quickstart-distill-dense \\
        --dense runs/quickstart-dense --rss --json bench_serving.json
    .venv/bin/python scripts/bench_serving.py --quick      # builds tiny runs itself (seconds)

Per model (any subset of the four; they must share the pod's device count):

- ``param_bytes`` / ``expert_bytes``: parameters as stored (int8 1, packed int4 1/2, float32 4
  bytes a value), all of them and the expert banks alone (``moe.serving.speed.param_bytes``);
- ``decode_tokens_per_second``: generated tokens (up to eos) per second of
  ``Evaluator.decode_ids`` on one ``eval.batch_size`` batch of the float run's first translate
  task (``--task``), after one untimed call each; ``--rounds`` timed calls per model go
  round-robin over the models so that load changes hit them alike; median of the rates
  (``moe.serving.speed.decode_rates``); the run's own decoding settings. Tokens/s depends on
  the outputs' lengths (the loop runs until the longest row ends), so ``decode_ms_per_step``
  (time per decoder position; "speed vs float" in the table) compares different models;
- ``peak_rss_mb`` (``--rss``): peak resident memory of a fresh process that restores the run
  and decodes the batch once. It includes the JAX runtime and compiled programs, so compare
  differences between rows, not the absolute numbers.

Also ``matmul``: one expert bank's first matmul ``[E, C, d] x [E, d, f]`` timed as float32,
with int8 weights dequantised in the program (what the int8 model runs), and as int8 x int8 ->
int32 with the activations quantised per row (a W8A8 kernel, which the model does not use):
whether XLA:CPU rewards integer matmuls. ``--quick`` builds untrained tiny runs (a 4-expert MoE
and dense students), so only the plumbing and the byte counts mean something there.
Output: a table on stdout and, with ``--json FILE``, ``{"models": {...}, "matmul": {...},
"setting": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moe import config as cfg
from moe.pod.simulate import ensure_virtual_devices

NAMES = ("float", "int8", "student", "dense")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in NAMES:
        p.add_argument(f"--{name}", help=f"run directory of the {name} model")
    p.add_argument("--task", help="task to decode (default: the float run's first translate)")
    p.add_argument("--rounds", type=int, default=5, help="timed decode calls per model")
    p.add_argument("--rss", action="store_true", help="peak RSS per model (one process each)")
    p.add_argument("--quick", action="store_true", help="build tiny untrained runs and time them")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--rss-child", nargs=2, metavar=("RUN", "SRC"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quick_runs(root: Path) -> dict[str, Path]:
    """Four untrained tiny runs: a float MoE, its int8 quantisation, two dense students."""
    from flax import nnx

    from moe.pathways import surgery
    from moe.serving.quantize import quantize_params, quantized_experiment
    from moe.training import build

    model = {"d_model": 32, "num_heads": 2, "d_ff": 64, "vocab_size": 64, "dropout": 0.0}
    raw = {
        "name": "q",
        "model": {**model, "max_source_length": 12, "max_target_length": 12},
        "moe": {"num_experts": 4, "every": 2},
        "tasks": [{"name": "rev", "kind": "translate", "source": "tsv:none.tsv"}],
        "eval": {"batch_size": 8, "max_decode_length": 12},
    }
    teacher = cfg.from_dict(raw)
    dense = cfg.from_dict({**raw, "name": "d", "moe": {"every": 0}})
    qexp = quantized_experiment(teacher, 8, False, "q-int8")
    params = lambda exp, seed: nnx.split(build.build_model(exp, seed), nnx.Param)[1]
    runs = {n: root / n for n in NAMES}
    surgery.write_run(teacher, runs["float"], params(teacher, 0), 0, {})
    surgery.write_run(qexp, runs["int8"], quantize_params(params(teacher, 0), qexp), 0, {})
    surgery.write_run(dense, runs["student"], params(dense, 1), 0, {})
    surgery.write_run(dense, runs["dense"], params(dense, 2), 0, {})
    return runs


def sources(exp, task: str | None, quick: bool) -> tuple[int, np.ndarray]:
    """(task index, one eval batch of its test sources) to decode."""
    kinds = [t.kind for t in exp.tasks]
    names = [t.name for t in exp.tasks]
    ti = names.index(task) if task else (kinds.index("translate") if "translate" in kinds else 0)
    bs, width = exp.eval.batch_size, exp.model.max_source_length
    if quick:
        rng = np.random.default_rng(0)
        src = rng.integers(4, exp.model.vocab_size, (bs, width)).astype(np.int32)
        src[:, -1] = 3  # eos
        return ti, src
    from moe.data.pipeline import prepare

    _, _, src = prepare(exp, say=lambda *a, **k: None).references(ti, exp.eval.split, bs)
    return ti, src


def rss_child(run: str, src_file: str) -> int:
    """Restore ``run``, decode the saved batch once, print the peak RSS in MiB."""
    exp = cfg.load(Path(run) / "config.yaml")
    ensure_virtual_devices(exp.pod_devices)
    from moe.training.evaluation import Evaluator
    from moe.training.restore import restore

    data = np.load(src_file)
    restored = restore(Path(run))
    Evaluator(restored.exp, None, restored.placement).decode_ids(
        restored.params, data["src"], int(data["task"])
    )
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux: the high-water mark of this
    program's memory, reset by exec), else ru_maxrss (which on Linux may keep the parent's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(run: Path, src: np.ndarray, task: int, tmp: Path) -> float:
    path = tmp / "src.npz"
    np.savez(path, src=src, task=task)
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(run), str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def matmul_ms(e: int, d: int, f: int, c: int, rounds: int) -> dict[str, float]:
    """Median ms of the expert matmul as float32, dequantised int8 and int8 x int8 -> int32."""
    import jax
    import jax.numpy as jnp

    from moe.layers import quant

    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (e, c, d))
    w = 0.05 * jax.random.normal(k2, (e, d, f))
    q, s = quant.quantize(w, 8, (1,))

    def w8a8(x, q, s):
        sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0  # per row
        xq = jnp.round(x / sx).astype(jnp.int8)
        y = jnp.einsum("ecd,edf->ecf", xq, q, preferred_element_type=jnp.int32)
        return y.astype(jnp.float32) * sx * s

    calls = {
        "float32": (jax.jit(lambda x, w: jnp.einsum("ecd,edf->ecf", x, w)), (x, w)),
        "int8_dequantised": (
            jax.jit(lambda x, q, s: jnp.einsum("ecd,edf->ecf", x, quant.dequantize(q, s, 1))),
            (x, q, s),
        ),
        "int8_x_int8": (jax.jit(w8a8), (x, q, s)),
    }
    times: dict[str, list[float]] = {n: [] for n in calls}
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = (
            quick_runs(tmp)
            if args.quick
            else {n: Path(p) for n in NAMES if (p := getattr(args, n))}
        )
        if not runs:
            raise SystemExit("bench_serving: give at least one of --float --int8 --student --dense")
        return bench(runs, args, tmp)


def bench(runs: dict[str, Path], args, tmp: Path) -> int:
    exps = {n: cfg.load(p / "config.yaml") for n, p in runs.items()}
    devices = {e.pod_devices for e in exps.values()}
    if len(devices) > 1:
        raise SystemExit(f"bench_serving: the runs need different device counts {devices}")
    ensure_virtual_devices(devices.pop())
    from moe.data.vocab import EOS_ID
    from moe.serving import speed
    from moe.training.evaluation import Evaluator
    from moe.training.restore import restore

    first = exps.get("float") or next(iter(exps.values()))
    task, src = sources(first, args.task, args.quick)
    restored = {n: restore(p) for n, p in runs.items()}
    models = {n: (Evaluator(r.exp, None, r.placement), r.params) for n, r in restored.items()}
    rates = speed.decode_rates(models, src, task, eos_id=EOS_ID, rounds=args.rounds)
    rows = {}
    for name, r in restored.items():
        rows[name] = {
            "run": str(runs[name]),
            "param_bytes": speed.param_bytes(r.params),
            "expert_bytes": speed.param_bytes(r.params, experts_only=True),
            "decode_tokens_per_second": rates[name].tokens_per_second,
            "decode_ms_per_step": rates[name].ms_per_step,
            "decode_tokens": rates[name].tokens,
            "decode_steps": rates[name].steps,
            "decode_seconds": list(rates[name].seconds),
        }
        if args.rss:
            rows[name]["peak_rss_mb"] = peak_rss(runs[name], src, task, tmp)
    m = first.model
    c = max(
        1, first.eval.batch_size * m.max_target_length * first.moe.top_k // first.moe.num_experts
    )
    mm = matmul_ms(first.moe.num_experts, m.d_model, m.d_ff, c, args.rounds)
    setting = {
        "task": first.tasks[task].name,
        "rows": int(src.shape[0]),
        "rounds": args.rounds,
        "quick": args.quick,
        "matmul_shape": [first.moe.num_experts, c, m.d_model, m.d_ff],
    }
    print(table(rows, mm, setting))
    if args.json:
        out = {"models": rows, "matmul": mm, "setting": setting}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def table(rows: dict, mm: dict, setting: dict) -> str:
    base = rows.get("float")
    lines = [
        f"decode of {setting['rows']} `{setting['task']}` sources, {setting['rounds']} rounds",
        f"{'model':8s} {'params MB':>10s} {'experts MB':>11s} {'tokens/s':>10s} "
        f"{'ms/step':>8s} {'steps':>6s} {'speed vs float':>15s} {'peak RSS MB':>12s}",
    ]
    for name, r in rows.items():
        vs = base["decode_ms_per_step"] / r["decode_ms_per_step"] if base else 1.0
        rss = f"{r['peak_rss_mb']:12.0f}" if "peak_rss_mb" in r else f"{'-':>12s}"
        lines.append(
            f"{name:8s} {r['param_bytes'] / 2**20:10.3f} {r['expert_bytes'] / 2**20:11.3f} "
            f"{r['decode_tokens_per_second']:10.0f} {r['decode_ms_per_step']:8.2f} "
            f"{r['decode_steps']:6d} {vs:14.2f}x {rss}"
        )
    e, c, d, f = setting["matmul_shape"]
    lines.append(f"expert matmul [{e},{c},{d}]x[{e},{d},{f}] ms: " + ", ".join(
        f"{k} {v:.3f}" for k, v in mm.items()
    ))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
