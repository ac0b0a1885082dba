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
  ``n`` over host-wide rates, each kernel costs ``op_overhead``, each program
  ``step_overhead``; all measured with ``n`` devices running at once (``pod/calibrate.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe.pod.calibrate import calibrate_cpu
from moe.pod.hlo import Collective, ProgramCost, program_cost
from moe.pod.topology import PodSlice, device_coords

__all__ = ["Projection", "calibrate_cpu", "collective_time", "group_extent", "project"]


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
    chip = pod.chip.for_devices(pod.num_chips)
    return n * c.bytes / chip.link_bandwidth + chip.link_latency


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
    host = pod.kind.interconnect == "host"
    chip = pod.chip.for_devices(pod.num_chips) if host else pod.chip
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
    if host:  # op_overhead is per kernel of one device's program, devices sharing the host
        kernels = cost.num_kernels * chip.op_overhead + chip.step_overhead
        parts["kernels_s"] = kernels
        total = compute + memory + collective + kernels
    else:
        total = max(compute, memory) + collective
    return Projection(compute, memory, collective, total, parts)
