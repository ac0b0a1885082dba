"""Projected step time on a pod slice, from the compiled program (``pod/hlo.py``).

    total = max(compute, memory) + collectives            (accelerators: rooflines overlap)
    total = compute + memory + collectives + kernels      (CPU host: ops run one after another)

- compute = FLOPs per device / peak FLOP/s per chip; memory = bytes accessed / HBM bandwidth
  (CPU host: only the non-matmul kernels, each at the bandwidth of the cache level its
  footprint fits in, ``Chip.bandwidth_curve``).
- collectives, on a ``torus`` (TPU), for a group spanning ``k_i`` chips along physical dim
  ``i`` (``wrap`` if the slice wraps there), link bandwidth ``b`` per direction, payload ``B``:
  - all-to-all: every device sends ``B / n`` to each of the ``n`` group members; along dim
    ``i`` the byte-hops ``n * B * h_i`` (``h_i`` the mean ring/line distance, ``~k/4`` with
    wraparound, ``~k/3`` without) share ``2n`` directed links (``2n (k-1)/k`` without wrap):
    ``t = max_i B * h_i / (2 b)``; on a ``sqrt(D) x sqrt(D)`` torus ``t ~ B sqrt(D) / (8 b)``,
    GShard's ``O(sqrt(D))`` (Lepikhin et al. 2020 §5 / papers §2.4).
  - all-reduce: ring reduce-scatter then all-gather, one dim after another (bidirectional
    ring with wrap, ``2b``; ``b`` on a line): ``2 sum_i (k_i - 1)/k_i * B_i / bw_i`` with
    ``B_1 = B``, ``B_{i+1} = B_i / k_i`` (~constant in D, papers §10); all-gather and
    reduce-scatter are half of that for the full buffer.
  - plus ``link_latency`` per ring step / mean hop.
  On a ``switch`` (NVSwitch) every device has ``links * b`` to the switch: all-to-all
  ``B (n-1)/n / (links b)``, all-reduce ``2 B (n-1)/n / (links b)``. On the CPU ``host`` a
  collective is a memory copy of ``n * B`` bytes at the host's copy bandwidth plus a fixed
  synchronisation cost (``link_latency``).
- CPU host only: the ``n`` virtual devices share the host, so per-device work is multiplied by
  ``n``, and each kernel launch costs ``op_overhead``, each program ``step_overhead``
  (figures from :func:`calibrate_cpu`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from moe.pod.hlo import Collective, ProgramCost, program_cost
from moe.pod.topology import CPU_NOMINAL, Chip, PodSlice, device_coords


@dataclasses.dataclass(frozen=True)
class Projection:
    """Projected seconds per execution on one slice; ``breakdown`` has the parts by name
    (``all-to-all_s``, ``kernels_s``, ``flops``, ``all-to-all_bytes``, ...)."""

    compute_s: float
    memory_s: float
    collective_s: float
    total_s: float
    breakdown: dict[str, float]


def _ring_mean_hops(k: int, wrap: bool) -> float:
    """Mean distance from a node to all ``k`` nodes (itself included) on a ring or a line."""
    if k <= 1:
        return 0.0
    if wrap:
        return (k * k // 4) / k
    return (k * k - 1) / (3 * k)


def group_extent(pod: PodSlice, group: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """``(k, stride, wrap)`` per physical dim for the chips of one replica group."""
    coords = [device_coords(pod, d % pod.num_chips) for d in group]
    out = []
    for i, full in enumerate(pod.shape):
        values = sorted({c[i] for c in coords})
        k = len(values)
        stride = (values[-1] - values[0]) // (k - 1) if k > 1 else 1
        out.append((k, max(stride, 1), pod.wraparound[i] and k * stride == full))
    return out


def _torus_time(c: Collective, pod: PodSlice) -> float:
    chip = pod.chip
    dims = [(k, s, w) for k, s, w in group_extent(pod, c.group) if k > 1]
    if not dims:
        return 0.0
    b = chip.link_bandwidth
    if c.kind == "all-to-all":
        hops = [_ring_mean_hops(k, w) * s for k, s, w in dims]
        links = [2 * (1.0 if w else (k - 1) / k) for k, s, w in dims]
        return max(c.bytes * h / (n * b) for h, n in zip(hops, links)) + chip.link_latency * sum(
            hops
        )
    if c.kind == "collective-permute":
        return c.bytes / b + chip.link_latency * max(s for _, s, _ in dims)
    full, size = 0.0, float(c.bytes)
    for k, s, w in dims:
        full += (k - 1) / k * size / (b * (2 if w else 1)) + chip.link_latency * (k - 1) * s
        size /= k
    full *= 2  # reduce-scatter pass + all-gather pass
    return full if c.kind == "all-reduce" else full / 2


def _switch_time(c: Collective, pod: PodSlice) -> float:
    n, chip = c.group_size, pod.chip
    if n <= 1:
        return 0.0
    bw = chip.link_bandwidth * chip.links_per_chip
    share = c.bytes * (n - 1) / n
    factor = {"all-reduce": 2.0, "collective-permute": n / (n - 1)}.get(c.kind, 1.0)
    return factor * share / bw + chip.link_latency * (n - 1)


def _host_time(c: Collective, pod: PodSlice) -> float:
    n = c.group_size * c.num_groups
    if c.group_size <= 1:
        return 0.0
    return n * c.bytes / pod.chip.link_bandwidth + pod.chip.link_latency


def collective_time(c: Collective, pod: PodSlice) -> float:
    """Seconds for one collective on ``pod`` (module docstring)."""
    wiring = pod.kind.interconnect
    if wiring == "torus":
        return _torus_time(c, pod)
    if wiring == "switch":
        return _switch_time(c, pod)
    return _host_time(c, pod)


def project(compiled_or_cost: Any, pod: PodSlice) -> Projection:
    """Projected time of one execution of a compiled program (or its ``ProgramCost``) on
    ``pod``. The program should be compiled for ``pod.num_chips`` devices."""
    cost = compiled_or_cost
    if not isinstance(cost, ProgramCost):
        cost = program_cost(compiled_or_cost)
    if cost.num_devices != pod.num_chips:
        raise ValueError(
            f"the program was compiled for {cost.num_devices} device(s) but {pod.name} has "
            f"{pod.num_chips} chips; compile it on a mesh of that many (virtual) devices"
        )
    chip = pod.chip
    host = pod.kind.interconnect == "host"
    share = pod.num_chips if host else 1  # virtual devices take turns on the host
    compute = cost.flops * share / chip.peak_flops
    if host:  # matmuls are compute-bound; other kernels stream at their cache level's rate
        streamed = (k for k in cost.kernels if not k.matmul)
        memory = share * sum(k.bytes / chip.bandwidth_at(k.bytes) for k in streamed)
    else:
        memory = cost.bytes_accessed / chip.hbm_bandwidth
    parts: dict[str, float] = {"flops": cost.flops, "bytes_accessed": cost.bytes_accessed}
    collective = 0.0
    for c in cost.collectives:
        t = collective_time(c, pod)
        collective += t
        parts[f"{c.kind}_s"] = parts.get(f"{c.kind}_s", 0.0) + t
        parts[f"{c.kind}_bytes"] = parts.get(f"{c.kind}_bytes", 0.0) + c.bytes
    if host:
        kernels = cost.num_kernels * share * chip.op_overhead + chip.step_overhead
        parts["kernels_s"] = kernels
        total = compute + memory + collective + kernels
    else:
        total = max(compute, memory) + collective
    return Projection(compute, memory, collective, total, parts)


def _best_time(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu() -> dict[str, float]:
    """Measure this host in about two seconds (JAX on its CPU devices, float32).

    peak_flops: a 512^3 matmul. bandwidth_curve: bytes read + written per second by an
    elementwise op on 64 KiB .. 64 MiB arrays (caches, then DRAM; ``hbm_bandwidth`` is the
    last point), less the call overhead. link_bandwidth: a 64 MiB copy. op_overhead: per extra
    kernel in a chain of tiny unfusable ops. step_overhead: one call of a trivial program.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices("cpu")[0]
    n = 512
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    matmul = jax.jit(lambda a: a @ a)
    flops = 2 * n**3 / _best_time(matmul, a)
    tiny = jax.device_put(jnp.ones((4, 4), jnp.float32), dev)
    step = _best_time(jax.jit(lambda x: x + 1), tiny, repeats=50)
    scale = jax.jit(lambda x: x * 2.0 + 1.0)
    curve = []
    for mib in (0.0625, 0.25, 1, 4, 16, 64):
        x = jax.device_put(jnp.ones((int(mib * 2**18),), jnp.float32), dev)
        accessed = 2 * x.nbytes  # read + write
        seconds = _best_time(scale, x, repeats=3 if mib > 8 else 20) - step
        curve.append([accessed, accessed / max(seconds, 1e-7)])
    big = x
    copy = jax.jit(lambda x: jnp.copy(x)[::-1])
    copy_bw = 2 * big.nbytes / _best_time(copy, big)

    def chain(x, k):
        for _ in range(k):
            x = jnp.tanh(x @ x)  # a dot cannot fuse with the next dot
        return x

    one, many = jax.jit(lambda x: chain(x, 1)), jax.jit(lambda x: chain(x, 41))
    per_op = max((_best_time(many, tiny, repeats=20) - _best_time(one, tiny, repeats=20)) / 80, 0)
    return {
        "peak_flops": flops,
        "hbm_bandwidth": curve[-1][1],
        "bandwidth_curve": curve,
        "link_bandwidth": copy_bw,
        "op_overhead": per_op,
        "step_overhead": step,
    }


def calibrate_cpu(cache: str | Path | None = None, *, refresh: bool = False) -> Chip:
    """The CPU host's ``Chip`` with measured figures, cached as JSON at ``cache``."""
    path = Path(cache) if cache else None
    if path is not None and path.is_file() and not refresh:
        figures = json.loads(path.read_text())
    else:
        figures = measure_cpu()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(figures, indent=2))
    sources = {k: "measured on this host by moe.pod.cost.measure_cpu" for k in figures}
    return dataclasses.replace(
        CPU_NOMINAL,
        name="CPU host (calibrated)",
        peak_flops=figures["peak_flops"],
        hbm_bandwidth=figures["hbm_bandwidth"],
        link_bandwidth=figures["link_bandwidth"],
        op_overhead=figures["op_overhead"],
        step_overhead=figures["step_overhead"],
        bandwidth_curve=tuple((float(a), float(b)) for a, b in figures["bandwidth_curve"]),
        link_latency=figures.get("link_latency", CPU_NOMINAL.link_latency),
        sources=sources,
    )
