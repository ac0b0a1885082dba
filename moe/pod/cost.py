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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moe.pod.calibrate import calibrate_cpu
from moe.pod.hlo import Collective, ProgramCost, program_cost
from moe.pod.topology import PodSlice, device_coords

__all__ = [
    "Projection",
    "calibrate_cpu",
    "collective_time",
    "group_extent",
    "project",
    "traffic_pricer",
    "traffic_time",
]


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


def _torus_links(pod: PodSlice, a: int, b: int) -> tuple[dict[tuple, float], int]:
    """Directed links ``(node, dim, +1|-1) -> share of the bytes`` that a message from chip
    ``a`` to chip ``b`` crosses (dimension-ordered routing, shortest way round a wrapped dim,
    an even split when both ways are as short), and its hop count."""
    here = list(device_coords(pod, a))
    goal = device_coords(pod, b)
    paths: list[tuple[float, list[int], list[tuple]]] = [(1.0, here, [])]
    for i, k in enumerate(pod.shape):
        grown = []
        for share, at, links in paths:
            forward = (goal[i] - at[i]) % k if pod.wraparound[i] else goal[i] - at[i]
            ways = [forward]
            if pod.wraparound[i] and forward:
                back = forward - k  # the other way round
                ways = (
                    [forward] if forward < -back else [back] if -back < forward else [forward, back]
                )
            for step in ways:
                pos, hops = list(at), []
                for _ in range(abs(step)):
                    sign = 1 if step > 0 else -1
                    hops.append((tuple(pos), i, sign))
                    pos[i] = (pos[i] + sign) % k
                grown.append((share / len(ways), pos, links + hops))
        paths = grown
    loads: dict[tuple, float] = {}
    for share, _, links in paths:
        for link in links:
            loads[link] = loads.get(link, 0.0) + share
    return loads, max(len(links) for _, _, links in paths)


def traffic_time(
    traffic: np.ndarray,
    pod: PodSlice,
    devices: Sequence[int] | None = None,
    *,
    hosts: Sequence[int] | None = None,
    host_bandwidth: float | None = None,
) -> float:
    """Seconds for one all-to-all with uneven pair sizes: ``traffic[i, j]`` bytes go from
    device ``devices[i]`` to ``devices[j]`` (default: devices ``0..n-1`` of ``pod``), all at
    once. Bytes that stay on a device (the diagonal) cost nothing.

    - ``torus``: every message follows its dimension-ordered shortest route (split evenly
      when both ways round a wrapped dim are as short); the time is the busiest directed
      link's bytes over the link bandwidth, plus ``link_latency`` per hop of the longest
      route taken. For uniform traffic (each device ``B/n`` to each) this equals the
      ``all-to-all`` of :func:`collective_time` on rings with wraparound and on 2-chip
      lines (there every link is equally busy); on longer lines it is the busiest link
      where :func:`collective_time` takes the mean.
    - ``switch``: the busiest device's bytes out or in over its ``links * b``, plus
      ``link_latency * (n - 1)`` (uniform traffic: :func:`collective_time`).
    - ``host`` (CPU): every byte that changes device is one copy at the host's copy
      bandwidth, plus ``link_latency`` once.

    ``hosts`` (host id of each of the ``n`` devices) with ``host_bandwidth`` (bytes/s per
    host, each way) add the busiest host's bytes out of or into it over that bandwidth: a
    network between hosts that the pod's own wiring does not span (not TPU ICI).
    """
    traffic = np.asarray(traffic, np.float64)
    n = traffic.shape[0]
    price = traffic_pricer(pod, list(range(n)) if devices is None else devices, hosts=hosts,
                           host_bandwidth=host_bandwidth)  # fmt: skip
    return price(traffic)


def traffic_pricer(
    pod: PodSlice,
    devices: Sequence[int],
    *,
    hosts: Sequence[int] | None = None,
    host_bandwidth: float | None = None,
) -> Callable[[np.ndarray], float]:
    """:func:`traffic_time` for a fixed device list, with the routes worked out once (a
    placement search prices thousands of traffic matrices)."""
    devices = list(devices)
    n, chip, wiring = len(devices), pod.chip, pod.kind.interconnect
    off_diagonal = 1.0 - np.eye(n)
    routes, hops = None, None
    if wiring == "torus":  # share of pair (i, j)'s bytes on each directed link: [n * n, L]
        index: dict[tuple, int] = {}
        rows, hops = [], np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                links, hops[i, j] = _torus_links(
                    pod, devices[i] % pod.num_chips, devices[j] % pod.num_chips
                )
                rows.append({index.setdefault(k, len(index)): v for k, v in links.items()})
        routes = np.zeros((n * n, max(len(index), 1)))
        for r, row in enumerate(rows):
            for c, v in row.items():
                routes[r, c] = v
    host_of = None if hosts is None or not host_bandwidth else np.asarray(hosts)

    def price(traffic: np.ndarray) -> float:
        traffic = np.asarray(traffic, np.float64)
        if traffic.shape != (n, n):
            raise ValueError(f"traffic must be [{n}, {n}] for {n} devices; got {traffic.shape}")
        off = traffic * off_diagonal
        if not off.any():
            return 0.0
        if wiring == "torus":
            busiest = float((off.reshape(-1) @ routes).max())
            t = busiest / chip.link_bandwidth + chip.link_latency * float(hops[off > 0].max())
        elif wiring == "switch":
            busiest = max(off.sum(0).max(), off.sum(1).max())
            t = busiest / (chip.link_bandwidth * chip.links_per_chip) + chip.link_latency * (n - 1)
        else:
            host = chip.for_devices(pod.num_chips)
            t = off.sum() / host.link_bandwidth + host.link_latency
        if host_of is not None:
            cross = traffic * (host_of[:, None] != host_of[None, :])
            t += (
                max(
                    max(cross[host_of == h].sum(), cross[:, host_of == h].sum())
                    for h in np.unique(host_of)
                )
                / host_bandwidth
            )
        return float(t)

    return price


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
