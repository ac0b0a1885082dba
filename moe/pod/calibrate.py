"""Measured figures for the CPU host, so ``pod/cost.py`` can project (and be checked) here.

The host's virtual devices share its cores, so figures depend on how many devices run at
once: each is measured with one device and with all of this process's devices running the same
sharded program (aggregate rates over the host). ``Chip.for_devices(n)`` picks the variant.

Measured (float32, best of several calls):

- ``peak_flops``: FLOP/s of a dense layer's forward and backward per device
  (``[1024, 256] @ [256, 512]``: one forward, one input-gradient, one weight-gradient matmul,
  whose layouts run at quite different speeds on a CPU);
- ``bandwidth_curve``: bytes read + written per second by an elementwise op whose per-device
  footprint is 128 KiB .. 128 MiB (caches, then DRAM; 256 MiB in all at most), less the call
  overhead; ``hbm_bandwidth`` is its last point;
- ``op_overhead``: per extra kernel, from a chain of 41 tiny unfusable ops against 1;
- ``step_overhead``: one call of a trivial program;
- ``link_latency`` / ``link_bandwidth`` (several devices only): a tiny all-to-all, and one of
  2 MiB per device, i.e. what a collective costs when it is a copy inside this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from moe.pod.topology import CPU_NOMINAL, Chip


def _best(fn, *args, repeats: int = 5) -> float:
    """Fastest of ``repeats`` calls, in seconds, after one warm-up call."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure(devices) -> dict:
    """Figures for ``devices`` (a list of CPU devices) running one sharded program at once."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(devices)
    mesh = Mesh(devices, ("d",))
    rows = NamedSharding(mesh, PartitionSpec("d"))
    put = lambda shape: jax.device_put(jnp.ones((n, *shape), jnp.float32), rows)  # [n, ...]

    tiny = put((4, 4))
    step = _best(jax.jit(lambda x: x + 1), tiny, repeats=50)
    x, w = put((1024, 256)), put((256, 512))

    def layer(x, w):  # a dense layer's forward and backward: the matmul mix of training
        loss = lambda x, w: jnp.sum(jnp.tanh(jnp.einsum("bmk,bkn->bmn", x, w)))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    train = jax.jit(layer)
    work = n * train.lower(x, w).compile().cost_analysis()["flops"]
    flops = work / _best(lambda x, w: train(x, w)[1], x, w, repeats=15)
    scale = jax.jit(lambda x: x * 2.0 + 1.0)
    curve = []
    for kib in (128, 512, 2048, 8192, 32768, 131072):
        per_device = min(kib * 1024, 2**28 // n)  # 256 MiB in all at most
        if curve and per_device <= curve[-1][0]:
            break
        x = put((per_device // 8,))  # float32: footprint = read + write = 8 bytes / element
        seconds = _best(scale, x, repeats=3 if per_device > 2**23 else 20) - step
        curve.append([per_device, n * per_device / max(seconds, 1e-7)])

    def chain(x, k):
        for _ in range(k):
            x = jnp.tanh(jnp.einsum("bij,bjk->bik", x, x))  # a dot does not fuse with a dot
        return x

    small = put((4, 4))
    one = _best(jax.jit(lambda x: chain(x, 1)), small, repeats=20)
    many = _best(jax.jit(lambda x: chain(x, 41)), small, repeats=20)
    figures = {
        "devices": n,
        "peak_flops": flops,
        "hbm_bandwidth": curve[-1][1],
        "bandwidth_curve": curve,
        "op_overhead": max((many - one) / 80, 0.0),
        "step_overhead": step,
    }
    if n > 1:
        figures.update(_collectives(jax, jnp, mesh, put))
    return figures


def _collectives(jax, jnp, mesh, put) -> dict:
    from jax.sharding import PartitionSpec

    def a2a(x):
        body = lambda b: jax.lax.all_to_all(b, "d", 1, 1, tiled=True)  # b: [1, n, m]
        spec = PartitionSpec("d")
        return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)(x)

    def four(x):
        for _ in range(4):
            x = a2a(x) * 1.5
        return x

    n = mesh.size
    tiny = put((n, 1))
    latency = max(
        (_best(jax.jit(four), tiny, repeats=20) - _best(jax.jit(a2a), tiny, repeats=20)) / 3, 0
    )
    big = put((n, 2**19 // n))  # 2 MiB per device
    seconds = _best(jax.jit(a2a), big, repeats=5) - latency
    return {"link_latency": latency, "link_bandwidth": n * 2**21 / max(seconds, 1e-7)}


def _chip(figures: dict, variants: tuple = ()) -> Chip:
    sources = {k: "measured on this host by moe.pod.calibrate" for k in figures}
    return dataclasses.replace(
        CPU_NOMINAL,
        name=f"CPU host (calibrated, {figures['devices']} device(s) at once)",
        peak_flops=figures["peak_flops"],
        hbm_bandwidth=figures["hbm_bandwidth"],
        bandwidth_curve=tuple((float(a), float(b)) for a, b in figures["bandwidth_curve"]),
        op_overhead=figures["op_overhead"],
        step_overhead=figures["step_overhead"],
        link_latency=figures.get("link_latency", CPU_NOMINAL.link_latency),
        link_bandwidth=figures.get("link_bandwidth", CPU_NOMINAL.link_bandwidth),
        sources=sources,
        variants=variants,
    )


def calibrate_cpu(cache: str | Path | None = None, *, refresh: bool = False) -> Chip:
    """The CPU host's ``Chip``, measured (about 3 s) or read from the JSON file ``cache``.

    The chip holds one variant per measured device count (1, and all of this process's CPU
    devices when there are several); ``cost.project`` uses ``chip.for_devices(n)``.
    """
    import jax

    path = Path(cache) if cache else None
    devices = jax.local_devices(backend="cpu")
    measured = None
    if path is not None and path.is_file() and not refresh:
        try:
            measured = json.loads(path.read_text())
        except ValueError:
            measured = None  # damaged (e.g. empty): measure again
        if not (isinstance(measured, list) and measured and isinstance(measured[0], dict)) or (
            "devices" not in measured[0]
        ):
            measured = None  # an older format: measure again
    if measured is None:
        measured = [measure(devices[:1])]
        if len(devices) > 1:
            measured.append(measure(devices))
        if path is not None:  # atomically: several ranks may calibrate at once
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(measured, indent=1))
            os.replace(tmp, path)
    variants = tuple((f["devices"], _chip(f)) for f in measured)
    return _chip(measured[0], variants)


def matmul_rate(cache: str | Path | None = None, *, size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of one jitted ``[size, size] @ [size, size]`` float32 matmul on one CPU device
    (XLA uses every core of the host for it): the reference rate of ``flop_utilisation``.
    Best of ``repeats`` calls; read from / written to the JSON file ``cache`` when given."""
    import jax
    import jax.numpy as jnp

    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        try:
            return float(json.loads(path.read_text())["matmul_flops"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: measure again
    device = jax.local_devices(backend="cpu")[0]
    x = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    rate = 2 * size**3 / _best(jax.jit(lambda a: a @ a), x, repeats=repeats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        load = os.getloadavg()[0]  # a busy host measures low: keep the load with the figure
        tmp.write_text(json.dumps({"matmul_flops": rate, "size": size, "load_average": load}))
        os.replace(tmp, path)
    return rate
