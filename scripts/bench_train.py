"""Steady-state training step of the quickstart for several process x device shapes.

Each run is the real step through the CLI (`moe train configs/quickstart.yaml`, under mpirun for
P > 1) on `cpu:N` virtual devices, mesh {data: N/E, expert: E}, E = min(4, N). Step time comes
from metrics.jsonl's timestamps without the first window (compilation); CPU time, context
switches and page faults from /proc over the same window. util = XLA's FLOPs of the compiled
step (train_summary.json: per device x devices) / step time / this host's jitted 2048x2048 f32
matmul rate. Repeats are interleaved (A B C A B C ...). Usage:
    .venv/bin/python scripts/bench_train.py [SPEC ...] [--repeats 2] [--json FILE]
Default specs: 1x1 1x2 1x8 2x4 2x1, and 2x1+mpi when MPITRAMPOLINE_LIB is set.
SPEC = PxD[+option...]: P processes x D devices each, with moe's defaults (tcmalloc preloaded
when installed; JAX's CPU async dispatch on in one process, off in several). Options: async /
sync (force JAX's CPU async dispatch on / off); malloc (glibc's malloc: MOE_NO_TCMALLOC=1); mpi
(MPI collectives via jaxlib's MPItrampoline: needs MPITRAMPOLINE_LIB and 1 device per process,
docs/perf_findings.md); NAME=VALUE (environment of every rank; XLA_FLAGS joins the device
flag); mpirun:ARG (e.g. mpirun:--bind-to=core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["1x1", "1x2", "1x8", "2x4", "2x1"]
TICK, TIMEOUT_S = os.sysconf("SC_CLK_TCK"), 1800
# Repeats load the compiled step from JAX's persistent cache (a temporary folder per invocation).
CACHE = {f"JAX_PERSISTENT_CACHE_MIN_{k}": "0" for k in ("COMPILE_TIME_SECS", "ENTRY_SIZE_BYTES")}


def parse_spec(spec: str) -> dict:
    shape, *opts = spec.split("+")
    p, d = (int(x) for x in shape.split("x"))
    env = {}
    run = {"spec": spec, "processes": p, "devices": d, "env": env, "mpirun": [], "mpi": False}
    for o in opts:
        if o in ("async", "sync"):
            env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "true" if o == "async" else "false"
        elif o == "malloc":
            env["MOE_NO_TCMALLOC"] = "1"
        elif o == "mpi":
            run["mpi"] = os.environ.get("MPITRAMPOLINE_LIB") or sys.exit("bench_train: no lib")
            env.update(BENCH_COLLECTIVES="mpi", MPITRAMPOLINE_LIB=run["mpi"])
        elif o.startswith("mpirun:"):
            run["mpirun"] += o[len("mpirun:") :].replace("=", " ", 1).split()
        elif "=" in o:
            env[o.split("=", 1)[0]] = o.split("=", 1)[1]
        else:
            sys.exit(f"bench_train: unknown option {o!r} in {spec!r}")
    return run


def command(run: dict, steps: int, log_every: int, runs_dir: str) -> tuple[list[str], dict]:
    n = run["processes"] * run["devices"]
    e = min(4, n)
    args = ["train", "configs/quickstart.yaml", f"train.steps={steps}", "eval.every=0",
            f"train.log_every={log_every}", "checkpoint.every=0", "eval.bleu_examples=0",
            "eval.batches=1", "name=b", f"runs_dir={runs_dir}", "pod.topology=cpu",
            f"pod.slice={n}", f"pod.mesh={{data: {n // e}, expert: {e}}}",
            f"pod.processes={run['processes']}", "--no-progress"]  # fmt: skip
    program = [sys.executable, "-m", "moe.cli"]
    if run["mpi"]:  # this script as the rank: it swaps gloo for MPI before moe.cli starts JAX
        program = [sys.executable, __file__, "--rank"]
    env = dict(os.environ, **run["env"], PYTHONPATH=str(ROOT))
    if not run["mpi"]:  # jaxlib loads MPITRAMPOLINE_LIB (and its MPI) whenever it is set
        env.pop("MPITRAMPOLINE_LIB", None)
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={run['devices']}"
    env["XLA_FLAGS"] = flags.strip()
    if run["processes"] == 1:
        return program + args, env
    from moe.parallel.distributed import mpirun_path

    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    bind = [] if "--bind-to" in run["mpirun"] else ["--bind-to", "none"]
    cmd = [mpirun_path(), "--oversubscribe", *bind, *run["mpirun"], "-np", str(run["processes"])]
    for k in ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "XLA_FLAGS",
              "PYTHONPATH", "JAX_COMPILATION_CACHE_DIR", *CACHE, *run["env"]]:  # fmt: skip
        cmd += ["-x", k]
    return cmd + program + args, env


def _json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:  # a line being written
        return {}
    return value if isinstance(value, dict) else {}


def session(sid: int, python: bool = False) -> list[int]:
    """The processes of session ``sid`` (the launcher and the ranks), or only its Python ones."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                if not python or b"python" in (d / "cmdline").read_bytes().split(b"\0")[0]:
                    out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def counters(pids: list[int]) -> dict:
    """CPU seconds (user, sys), context switches and minor faults of ``pids`` (all threads),
    and the CPU seconds the whole host was busy (to tell how much other jobs took)."""
    c = {"user": 0.0, "sys": 0.0, "vcsw": 0, "ivcsw": 0, "minflt": 0, "wall": time.time()}
    host = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    c["host_busy"] = (sum(host) - host[3] - host[4]) / TICK  # all but idle and iowait
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            c["minflt"] += int(f[7])
            c["user"] += int(f[11]) / TICK
            c["sys"] += int(f[12]) / TICK
            for t in Path(f"/proc/{p}/task").iterdir():
                for line in (t / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                        c["vcsw" if line[0] == "v" else "ivcsw"] += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return c


def run_once(run: dict, steps: int, log_every: int, flops: float | None) -> dict:
    """One run, stopped after its last train line (after train_summary.json when ``flops`` is
    None: a shape's FLOPs are the same in every repeat)."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cmd, env = command(run, steps, log_every, tmp)
        run_dir, log = Path(tmp) / "b", open(Path(tmp) / "log.txt", "w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        lines, snaps, pids, t0 = [], [], [], time.time()
        try:
            while proc.poll() is None and time.time() - t0 < TIMEOUT_S:
                time.sleep(0.2)
                metrics = run_dir / "metrics.jsonl"
                text = metrics.read_text() if metrics.exists() else ""
                new = [x for x in map(_json, text.splitlines()) if x.get("kind") == "train"]
                if len(new) > len(lines):
                    pids, lines = pids or session(proc.pid, python=True), new
                    snaps.append(counters(pids))
                if flops is None and (run_dir / "train_summary.json").exists():
                    summary = json.loads((run_dir / "train_summary.json").read_text())
                    flops = summary["model_flops_per_step"]  # XLA's FLOPs, all devices
                if flops is not None and lines and lines[-1]["step"] == steps:
                    break
            else:
                log.seek(0)
                raise RuntimeError(f"{run['spec']} failed:\n{log.read()[-3000:]}")
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # TERM lets Open MPI clean /dev/shm
                for p in session(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
    pairs = zip(lines, lines[1:])
    ms = [1000 * (y["time"] - x["time"]) / (y["step"] - x["step"]) for x, y in pairs]
    # a train line's task tokens are the sum over its logging window (metrics summed on device)
    tokens = statistics.mean(
        sum(t["tokens"] for t in y["tasks"].values()) / (y["step"] - x["step"])
        for x, y in zip(lines, lines[1:])
    )
    d = {k: snaps[-1][k] - snaps[0][k] for k in snaps[0]}
    steady = lines[-1]["step"] - lines[0]["step"]
    per_step = {k: d[k] / steady for k in ("user", "sys", "vcsw", "ivcsw", "minflt")}
    per_step["others"] = (d["host_busy"] - d["user"] - d["sys"]) / d["wall"]  # cores, other jobs
    return {"ms_windows": ms, "tokens_per_step": tokens, "flops": flops, "per_step": per_step,
            "load": os.getloadavg()[0]}  # fmt: skip


def matmul_rate(n: int = 2048, runs: int = 20) -> float:
    import jax
    import jax.numpy as jnp

    a, f = jnp.ones((n, n), jnp.float32), jax.jit(lambda x: x @ x)
    f(a).block_until_ready()  # compiles
    ts = timeit.repeat(lambda: f(a).block_until_ready(), number=1, repeat=runs)
    return 2 * n**3 / statistics.median(ts)


def main() -> None:
    if sys.argv[1:2] == ["--rank"]:  # one rank of a +mpi run: gloo -> BENCH_COLLECTIVES
        import jax

        update, impl = jax.config.update, os.environ.get("BENCH_COLLECTIVES")
        if impl:
            jax.config.update = lambda k, v: update(k, impl if "collectives_impl" in k else v)
        from moe.cli import main as moe_main

        sys.exit(moe_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="*", help="PxD[+option...]")
    ap.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    ap.add_argument("--log-every", type=int, default=10, help="window length (default 10)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    specs = a.specs or list(SHAPES)
    if not a.specs and os.environ.get("MPITRAMPOLINE_LIB"):
        specs.append("2x1+mpi")
    runs = [parse_spec(s) for s in specs]
    cache = tempfile.TemporaryDirectory(prefix="bench_train_cache_")
    os.environ.update(CACHE, JAX_COMPILATION_CACHE_DIR=cache.name)
    rate = matmul_rate()
    print(f"f32 matmul 2048^3: {rate / 1e9:.0f} GFLOP/s; load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list] = {r["spec"]: [] for r in runs}
    for rep in range(a.repeats):
        for r in runs:
            known = results[r["spec"]][0]["flops"] if results[r["spec"]] else None
            res = run_once(r, a.steps, a.log_every, known)
            results[r["spec"]].append(res)
            ms, others = statistics.median(res["ms_windows"]), res["per_step"]["others"]
            print(f"  [{rep + 1}/{a.repeats}] {r['spec']:<24} {ms:7.1f} ms/step  others "
                  f"{others:.2f}  load {res['load']:.2f}", flush=True)  # fmt: skip
    rate = max(rate, matmul_rate())
    rows = [row(spec, reps, rate) for spec, reps in results.items()]
    print(f"\n{'spec':<24} {'ms/step':>8} {'repeats':>13} {'tok/s':>6} {'util':>6} {'user':>6} "
          f"{'sys':>6} {'vcsw':>6} {'ivcsw':>6} {'minflt':>7} {'others':>6}  load")  # fmt: skip
    for w in rows:
        reps, load = ("/".join(f"{x:.{p}f}" for x in w[k]) for k, p in (("reps", 0), ("load", 1)))
        print(f"{w['spec']:<24} {w['ms_per_step']:8.1f} {reps:>13} {w['tokens_per_s']:6.0f} "
              f"{100 * w['utilisation']:5.1f}% {w['user']:6.3f} {w['sys']:6.3f} {w['vcsw']:6.0f} "
              f"{w['ivcsw']:6.0f} {w['minflt']:7.0f} {w['others']:6.2f}  {load}")  # fmt: skip
    print("user/sys: CPU s per step (all ranks); vcsw/ivcsw: (in)voluntary context switches per "
          "step; minflt: minor page faults per step; others: cores other jobs kept busy; load: "
          "1-min load average at each run's end (includes the run)")  # fmt: skip
    ms = {w["spec"].split("+")[0]: w["ms_per_step"] for w in reversed(rows)}  # first per shape
    ratio = ms["2x4"] / ms["1x8"] if {"2x4", "1x8"} <= ms.keys() else None
    print(f"2x4 / 1x8 step time: {ratio:.2f}" if ratio else "2x4 / 1x8: not both measured")
    print(f"f32 matmul rate: {rate / 1e9:.0f} GFLOP/s (util = step FLOPs / step time / this rate)")
    if a.json:
        out = {"matmul_flops_per_s": rate, "ratio_2x4_1x8": ratio, "rows": rows, "runs": results,
               "steps": a.steps, "log_every": a.log_every}  # fmt: skip
        Path(a.json).write_text(json.dumps(out, indent=1))


def row(spec: str, reps: list[dict], rate: float) -> dict:
    """One spec's repeats: median of all windows, rates, and per-step counters averaged."""
    ms = statistics.median(w for x in reps for w in x["ms_windows"])
    tok, flops = reps[0]["tokens_per_step"], reps[0]["flops"]
    per = {k: statistics.mean(x["per_step"][k] for x in reps) for k in reps[0]["per_step"]}
    return {"spec": spec, "ms_per_step": ms, "tokens_per_s": 1000 * tok / ms,
            "flops_per_step": flops, "utilisation": flops / (ms / 1000) / rate,
            "reps": [statistics.median(x["ms_windows"]) for x in reps],
            "load": [x["load"] for x in reps], **per}  # fmt: skip


if __name__ == "__main__":
    main()
