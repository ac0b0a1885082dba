"""What a placement of experts on devices costs, from a run's routing statistics.

A placement gives each MoE layer's experts a column of the mesh's ``expert`` axis (``EP``
columns, ``E / EP`` experts each; every ``data`` (and ``model``) index holds the same
layout). It is written ``dev[layer] = int[E]``, the column of each (old) expert. Its figures,
per training step (forward and backward):

- **device load**: kept expert choices per column, ``load_d = sum_{e on d} C[e, e]``;
  ``max_device_load`` is the largest ``max_d load_d / mean_d load_d`` over the layers (1 =
  balanced). ``projected_expert_ms``: the busiest column's expert FLOPs over the chip's peak,
  summed over layers (on a CPU host each of the ``n`` devices gets ``1/n`` of the host's
  measured rate, as ``moe.pod.cost.project`` counts them).
- **exchange**: the bytes each device sends to each other device, priced as one all-to-all
  with uneven pairs (``moe.pod.cost.traffic_pricer``; bytes that stay on a device are free,
  bytes that cross hosts can be priced with ``host_bandwidth``). Two schedules:

  ``home`` (this platform, GShard): every token lives on its home device (its routing group)
  and each MoE layer sends it to its experts' devices and back. A token is sent once to each
  device that holds one of its kept experts (a dropless, token-deduplicated exchange, what a
  ragged all-to-all would move; this platform sends capacity-padded buffers of a fixed size,
  so its measured step does not change with placement). With ``C`` the co-activation counts
  (``moe.routing.coactivation``), the tokens of a group that need device ``d`` are
  ``N_d = sum_{e on d} C[e, e] - sum_{e < f on d} C[e, f]`` (exact for k <= 2; inclusion-
  exclusion cut at pairs for k > 2, a lower bound); each group ``s`` sends ``N_d`` tokens to
  ``d`` and gets ``N_d`` partial sums back.

  ``affinity`` (ExFlow-style, Yao et al. 2024): after an MoE layer a token stays on the device
  of its first kept expert and the next MoE layer of its stack dispatches from there
  (``transition`` counts); each other kept expert's output goes to that device
  (``first_coactivation``); after the stack's last MoE layer tokens go home. Not what this
  platform runs: a projection of what co-locating consecutive layers' experts would save.

Traffic is counted in tokens per routing group per evaluation batch, scaled to a training
step by ``train.batch_size / eval.batch_size``, times ``d_model`` times the bytes per element.
Backward passes move the same bytes the other way (the transposed matrices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from moe.pod.cost import traffic_pricer
from moe.pod.topology import PodSlice

SCHEDULES = ("home", "affinity")
FIGURES = (
    "max_device_load",
    "projected_exchange_ms",
    "projected_expert_ms",
    "cross_device_bytes",
    "cross_host_bytes",
)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One MoE layer's counts per routing group and training step (module docstring)."""

    name: str
    coactivation: np.ndarray  # [E, E]
    first_coactivation: np.ndarray  # [E, E]
    previous: str | None = None  # previous MoE layer of the stack, if transition is known
    transition: np.ndarray | None = None  # [E_previous, E]

    @property
    def experts(self) -> int:
        return self.coactivation.shape[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The pod's devices as the exchange sees them.

    ``rows``: for every ``(data, model)`` index, the ids of its ``EP`` expert-axis devices
    (the all-to-all groups); ``hosts``: the host of every device of the pod."""

    rows: tuple[tuple[int, ...], ...]
    hosts: tuple[int, ...]

    @property
    def ep(self) -> int:
        return len(self.rows[0])

    @classmethod
    def for_mesh(cls, mesh: Mapping[str, int], hosts: int) -> Layout:
        """Mesh ``(data, expert[, model])`` in row-major device order; ``hosts`` equal blocks
        of consecutive devices (processes own contiguous devices)."""
        data, ep, tp = mesh.get("data", 1), mesh.get("expert", 1), mesh.get("model", 1)
        rows = tuple(
            tuple(d * ep * tp + e * tp + m for e in range(ep))
            for d in range(data)
            for m in range(tp)
        )
        n = data * ep * tp
        per = n // hosts
        return cls(rows, tuple(i // per for i in range(n)))


class CostModel:
    """Figures of placements for one run (module docstring)."""

    def __init__(
        self,
        layers: list[LayerStats],
        layout: Layout,
        pod: PodSlice,
        *,
        bytes_per_token: float,
        flops_per_choice: float,
        schedule: str = "home",
        host_bandwidth: float | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
        self.layers = {x.name: x for x in layers}
        self.order = [x.name for x in layers]
        self.layout, self.pod, self.schedule = layout, pod, schedule
        self.bytes_per_token, self.flops_per_choice = bytes_per_token, flops_per_choice
        n = len(layout.hosts)
        self._price = traffic_pricer(
            pod, range(n), hosts=layout.hosts, host_bandwidth=host_bandwidth
        )
        h = np.asarray(layout.hosts)
        self._cross_host = h[:, None] != h[None, :]
        nexts = {}
        for name in self.order:
            prev = self.layers[name].previous
            if prev is not None:
                nexts[prev] = name
        self._next = nexts

    # -- pieces ---------------------------------------------------------------------------------
    def identity(self) -> dict[str, np.ndarray]:
        """Experts ``[0, E/EP)`` on column 0, and so on: the layout a run starts with."""
        ep = self.layout.ep
        return {n: np.arange(x.experts) // (x.experts // ep) for n, x in self.layers.items()}

    def _full(self, row: np.ndarray) -> np.ndarray:
        """An ``[EP, EP]`` matrix of one row's traffic (tokens) as ``[D, D]`` bytes."""
        n = len(self.layout.hosts)
        out = np.zeros((n, n))
        for ids in self.layout.rows:
            out[np.ix_(ids, ids)] = row
        return out * self.bytes_per_token

    def _group(self, matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``sum_{e in column a, f in column b} matrix[e, f]`` as ``[EP, EP]``."""
        ep = self.layout.ep
        a = np.eye(ep)[rows]  # [E, EP]
        b = np.eye(ep)[cols]
        return a.T @ matrix @ b

    def _loads(self, stats: LayerStats, dev: np.ndarray) -> np.ndarray:
        return np.bincount(dev, weights=np.diag(stats.coactivation), minlength=self.layout.ep)

    def _needs(self, stats: LayerStats, dev: np.ndarray) -> np.ndarray:
        """``N_d``: tokens of a group with a kept expert on column ``d`` (module docstring)."""
        co = stats.coactivation
        same = dev[:, None] == dev[None, :]
        pairs = np.triu(co * same, 1)  # e < f on one column
        loads = self._loads(stats, dev)
        shared = np.bincount(dev, weights=pairs.sum(1), minlength=self.layout.ep)
        single = np.zeros(self.layout.ep)
        np.maximum.at(single, dev, np.diag(co))
        return np.maximum(loads - shared, single)

    def traffic(
        self, name: str, dev: Mapping[str, np.ndarray], stats: LayerStats | None = None
    ) -> list[np.ndarray]:
        """Layer ``name``'s forward messages, ``[EP, EP]`` tokens each (row total over the
        groups of a row); the backward pass sends their transposes. ``stats``: other counts
        for the layer (a partial placement's)."""
        stats, d = stats or self.layers[name], dev[name]
        ep = self.layout.ep
        off = 1.0 - np.eye(ep)
        home = np.broadcast_to(self._needs(stats, d), (ep, ep)) * off  # [s, d] = N_d
        if self.schedule == "home":
            return [home, home.T]
        first = np.diag(stats.first_coactivation)  # tokens whose first expert is e
        if stats.previous is not None and stats.transition is not None:
            out = [self._group(stats.transition, dev[stats.previous], d) * ep]
        else:
            out = [home]
        partials = stats.first_coactivation * (1.0 - np.eye(stats.experts))  # first e, other f
        out.append(self._group(partials.T, d, d) * ep)  # from f's column to e's column
        if name not in self._next:  # the stack's last MoE layer: tokens go home
            out.append(np.broadcast_to(np.bincount(d, weights=first, minlength=ep), (ep, ep)).T)
        return [m * off for m in out]

    # -- figures ----------------------------------------------------------------------------
    def layer_figures(
        self, name: str, dev: Mapping[str, np.ndarray], stats: LayerStats | None = None
    ) -> dict[str, float]:
        stats = stats or self.layers[name]
        loads = self._loads(stats, dev[name])
        ep = self.layout.ep
        exchange, cross, cross_host = 0.0, 0.0, 0.0
        for row in self.traffic(name, dev, stats):
            for m in (self._full(row), self._full(row.T)):  # forward, backward
                exchange += self._price(m)
                cross += float(m.sum())
                cross_host += float((m * self._cross_host).sum())
        chip, n = self.pod.chip, self.pod.num_chips
        peak = chip.peak_flops
        if self.pod.kind.interconnect == "host":  # n devices share the host's rate
            peak = chip.for_devices(n).peak_flops / n
        busiest = loads.max() * ep  # the EP groups of a row all send to a column
        mean = loads.mean()
        return {
            "max_device_load": float(loads.max() / mean) if mean > 0 else 1.0,
            "projected_exchange_ms": 1e3 * exchange,
            "projected_expert_ms": 1e3 * busiest * self.flops_per_choice / peak,
            "cross_device_bytes": cross,
            "cross_host_bytes": cross_host,
        }

    def affected(self, name: str) -> list[str]:
        """Layers whose figures change when ``name``'s placement does."""
        nxt = self._next.get(name)
        return [name] + ([nxt] if nxt is not None and self.schedule == "affinity" else [])

    def figures(self, dev: Mapping[str, np.ndarray]) -> dict:
        per_layer = {n: self.layer_figures(n, dev) for n in self.order}
        return summarize(per_layer)


def summarize(per_layer: Mapping[str, Mapping[str, float]]) -> dict:
    """Whole-step figures from per-layer ones (max of the load ratio, sums of the rest) and
    ``objective_ms`` = exchange + expert time, what the placers minimise."""
    rows = list(per_layer.values())
    out = {"max_device_load": max(r["max_device_load"] for r in rows)}
    for key in FIGURES[1:]:
        out[key] = sum(r[key] for r in rows)
    out["objective_ms"] = out["projected_exchange_ms"] + out["projected_expert_ms"]
    return out
