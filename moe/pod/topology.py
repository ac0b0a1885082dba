"""A catalogue of pods: TPU v2/v3/v4/v5e slices, an 8xH100 node, and this CPU host.

A *pod kind* (``tpu-v3``) names a chip and how chips are wired; a *slice* (``tpu-v3:4x4``) is a
concrete shape of that kind. ``cost.py`` projects step times onto a slice, ``simulate.py`` gives
it as many virtual CPU devices as it has chips.

Every figure carries its source, with the marks of docs/reference papers.md: [D] official
product documentation, [S] secondary source, UNVERIFIED where neither could be checked here
(papers.md §10 lists v2/v3/v4; v5e and H100 figures are not on that sheet and are marked so).
Units are SI: FLOP/s, bytes, bytes/s, seconds. ``link_bandwidth`` is per link and per direction.

Wiring (``interconnect``): ``torus`` chips sit on a 2D/3D grid with nearest-neighbour links,
wrapping around only on the dims listed in ``PodSlice.wraparound``; ``switch`` every chip reaches
every other through a switch (NVSwitch) at its full link bandwidth; ``host`` virtual devices of
one CPU host that share its cores and memory (figures for the whole host, ``cost.calibrate_cpu``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

GIB = 2**30
GBIT = 1e9 / 8  # bytes/s in one Gbit/s


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures (for ``host`` kinds: for the whole host, shared by its devices)."""

    name: str
    peak_flops: float  # bf16 FLOP/s (float32 for the CPU host)
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per link per direction
    links_per_chip: int
    link_latency: float  # seconds per collective step (hop / message), a rough figure
    sources: Mapping[str, str]
    step_overhead: float = 0.0  # seconds per executed program (host dispatch); CPU only
    op_overhead: float = 0.0  # seconds per executed kernel; CPU only
    # CPU only: (footprint bytes, bytes/s) of memory-bound kernels, ascending, for caches.
    bandwidth_curve: tuple[tuple[float, float], ...] = ()
    # CPU only: (devices at once, Chip) measured variants, see ``for_devices``.
    variants: tuple[tuple[int, Chip], ...] = ()

    def for_devices(self, n: int) -> Chip:
        """The measured variant for ``n`` devices sharing the host: the 1-device one for
        ``n == 1``, else the one measured with the most devices; ``self`` if none."""
        if not self.variants:
            return self
        if n == 1:
            ones = [c for k, c in self.variants if k == 1]
            if ones:
                return ones[0]
        return max(self.variants, key=lambda kc: kc[0])[1]

    def bandwidth_at(self, footprint: float) -> float:
        """Memory bandwidth for a kernel touching ``footprint`` bytes (log-interpolated on
        ``bandwidth_curve``; ``hbm_bandwidth`` when there is no curve)."""
        curve = self.bandwidth_curve
        if not curve:
            return self.hbm_bandwidth
        if footprint <= curve[0][0]:
            return curve[0][1]
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if footprint <= x1:
                w = math.log(footprint / x0) / math.log(x1 / x0)
                return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
        return curve[-1][1]


@dataclasses.dataclass(frozen=True)
class PodKind:
    """A family of slices: the chip, the wiring and the shapes one may ask for."""

    name: str
    chip: Chip
    interconnect: str  # "torus" | "switch" | "host"
    ndim: int  # dims of a slice shape (2 for v2/v3/v5e, 3 for v4, 1 for GPU node / CPU)
    shapes: tuple[tuple[int, ...], ...] | None  # allowed shapes, or None: checked by rule
    full_dims: tuple[int, ...]  # the whole pod; a slice dim equal to it wraps around
    note: str = ""


@dataclasses.dataclass(frozen=True)
class PodSlice:
    """One slice of a pod kind: ``shape`` chips, wired per ``kind.interconnect``."""

    kind: PodKind
    shape: tuple[int, ...]
    wraparound: tuple[bool, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chip(self) -> Chip:
        return self.kind.chip

    @property
    def name(self) -> str:
        return f"{self.kind.name}:{'x'.join(map(str, self.shape))}"

    def with_chip(self, chip: Chip) -> PodSlice:
        """The same slice with other chip figures (e.g. the calibrated CPU host)."""
        return dataclasses.replace(self, kind=dataclasses.replace(self.kind, chip=chip))


_V2 = Chip(
    name="TPU v2",
    peak_flops=45e12,
    hbm_bytes=16 * GIB,
    hbm_bandwidth=600e9,
    link_bandwidth=496 * GBIT,
    links_per_chip=4,
    link_latency=1e-6,
    sources={
        "peak_flops": "[S] 45 TFLOPS/chip: 180 TFLOPS per 4-chip board (papers §10)",
        "hbm_bytes": "[S] 16 GiB/chip (papers §10)",
        "hbm_bandwidth": "[S] 600 GB/s, some sources 700; UNVERIFIED (papers §10)",
        "link_bandwidth": "[S] 4 x 496 Gbit/s, Jouppi et al. CACM 2020; UNVERIFIED (papers §10)",
        "link_latency": "UNVERIFIED order-of-magnitude guess (1 us per step)",
        "wraparound": "[S] 16x16 2D torus for the full pod; sub-slice wraparound UNVERIFIED",
    },
)
_V3 = Chip(
    name="TPU v3",
    peak_flops=123e12,
    hbm_bytes=32 * GIB,
    hbm_bandwidth=900e9,
    link_bandwidth=656 * GBIT,
    links_per_chip=4,
    link_latency=1e-6,
    sources={
        "peak_flops": "[D] 123 TFLOPS/chip bf16 (papers §10)",
        "hbm_bytes": "[D] 32 GiB/chip (papers §10)",
        "hbm_bandwidth": "[D] 900 GB/s (papers §10)",
        "link_bandwidth": "[S] 4 x 656 Gbit/s, Jouppi et al. CACM 2020; UNVERIFIED (papers §10)",
        "link_latency": "UNVERIFIED order-of-magnitude guess (1 us per step)",
        "wraparound": "[D] 2D torus; [S] 32x32 full pod; sub-slice wraparound UNVERIFIED",
    },
)
_V4 = Chip(
    name="TPU v4",
    peak_flops=275e12,
    hbm_bytes=32 * GIB,
    hbm_bandwidth=1200e9,
    link_bandwidth=400 * GBIT,
    links_per_chip=6,
    link_latency=1e-6,
    sources={
        "peak_flops": "[D] 275 TFLOPS/chip bf16 (papers §10)",
        "hbm_bytes": "[D] 32 GiB HBM2 (papers §10)",
        "hbm_bandwidth": "[D] 1200 GB/s (papers §10)",
        "links_per_chip": "[D-implied] 6 links, 3D (papers §10)",
        "link_bandwidth": "UNVERIFIED: 400 Gbit/s per link (2400 Gbit/s per chip, from memory)",
        "link_latency": "UNVERIFIED order-of-magnitude guess (1 us per step)",
        "wraparound": "[D] 3D torus on slices whose dims are multiples of 4 (papers §10)",
    },
)
_V5E = Chip(
    name="TPU v5e",
    peak_flops=197e12,
    hbm_bytes=16 * GIB,
    hbm_bandwidth=819e9,
    link_bandwidth=400 * GBIT,
    links_per_chip=4,
    link_latency=1e-6,
    sources={
        "peak_flops": "UNVERIFIED: 197 TFLOPS bf16 (Cloud TPU docs, from memory; not in papers)",
        "hbm_bytes": "UNVERIFIED: 16 GiB HBM2 (Cloud TPU docs, from memory)",
        "hbm_bandwidth": "UNVERIFIED: 819 GB/s (Cloud TPU docs, from memory)",
        "link_bandwidth": "UNVERIFIED: 1600 Gbit/s ICI per chip over 4 links (from memory)",
        "link_latency": "UNVERIFIED order-of-magnitude guess (1 us per step)",
        "wraparound": "UNVERIFIED: 2D torus only on the full 16x16 pod dims",
    },
)
_H100 = Chip(
    name="NVIDIA H100 SXM",
    peak_flops=989e12,
    hbm_bytes=80e9,
    hbm_bandwidth=3.35e12,
    link_bandwidth=25e9,
    links_per_chip=18,
    link_latency=3e-6,
    sources={
        "peak_flops": "UNVERIFIED: 989 TFLOPS dense bf16, H100 SXM datasheet (from memory)",
        "hbm_bytes": "UNVERIFIED: 80 GB HBM3 (datasheet, from memory)",
        "hbm_bandwidth": "UNVERIFIED: 3.35 TB/s (datasheet, from memory)",
        "link_bandwidth": "UNVERIFIED: NVLink4 18 links, 900 GB/s both ways per GPU",
        "link_latency": "UNVERIFIED order-of-magnitude guess (3 us per NCCL step)",
    },
)
# Placeholder host figures: `cost.calibrate_cpu` measures real ones, `with_chip` swaps them in.
CPU_NOMINAL = Chip(
    name="CPU host (uncalibrated)",
    peak_flops=50e9,
    hbm_bytes=8 * GIB,
    hbm_bandwidth=5e9,
    link_bandwidth=5e9,
    links_per_chip=1,
    link_latency=20e-6,
    sources={"all": "nominal placeholders; run moe.pod.cost.calibrate_cpu for measured figures"},
    step_overhead=100e-6,
    op_overhead=5e-6,
)

_V23_SHAPES = ((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
_V4_SMALL = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4))
_V5E_SHAPES = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))

KINDS: dict[str, PodKind] = {
    k.name: k
    for k in (
        PodKind("tpu-v2", _V2, "torus", 2, _V23_SHAPES, (16, 16), "256-chip pod, 16x16 [S]"),
        PodKind(
            "tpu-v3",
            _V3,
            "torus",
            2,
            (*_V23_SHAPES, (16, 32), (32, 32)),
            (32, 32),
            "1024-chip pod [D]",
        ),
        PodKind(
            "tpu-v4",
            _V4,
            "torus",
            3,
            None,
            (16, 16, 16),
            "4096-chip pod [D]; slices 2x2x1..2x4x4, then dims multiple of 4",
        ),
        PodKind("tpu-v5e", _V5E, "torus", 2, _V5E_SHAPES, (16, 16), "256-chip pod, UNVERIFIED"),
        PodKind("gpu-h100", _H100, "switch", 1, tuple((n,) for n in range(1, 9)), (8,), "1 node"),
        PodKind("cpu", CPU_NOMINAL, "host", 1, None, (0,), "virtual devices of this host"),
    )
}


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"slice {text!r} is not a shape like 4x4, 2x2x4 or 8") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"slice {text!r} must have positive dimensions")
    return dims


def _v4_wraparound(shape: tuple[int, ...]) -> tuple[bool, ...]:
    if tuple(shape) in _V4_SMALL:
        return (False, False, False)
    if any(d % 4 or d > 16 for d in shape):
        small = ", ".join("x".join(map(str, s)) for s in _V4_SMALL)
        raise ValueError(
            f"tpu-v4 slice {'x'.join(map(str, shape))} is not valid: use {small}, or dims that "
            "are multiples of 4 up to 16 (e.g. 4x4x4, 4x4x8, 8x8x16)"
        )
    return (True, True, True)


def get_slice(topology: str, slice_text: str | int | None = None) -> PodSlice:
    """The slice ``slice_text`` of pod kind ``topology`` (``None`` = one chip).

    Raises ``ValueError`` with one line naming the bad part and the valid choices.
    """
    if topology not in KINDS:
        raise ValueError(f"unknown pod topology {topology!r}; known: {', '.join(KINDS)}")
    kind = KINDS[topology]
    if slice_text is None or slice_text == "":
        # One chip of this kind (a projection target even where no 1-chip slice is sold).
        return PodSlice(kind, (1,) * kind.ndim, (False,) * kind.ndim)
    shape = _dims(str(slice_text))
    if kind.interconnect == "host":
        return PodSlice(kind, (math.prod(shape),), (False,))
    if len(shape) != kind.ndim:
        raise ValueError(
            f"{topology} slices have {kind.ndim} dims (e.g. {_example(kind)}), got {slice_text!r}"
        )
    if kind.name == "tpu-v4":
        return PodSlice(kind, shape, _v4_wraparound(shape))
    if shape not in kind.shapes:
        valid = ", ".join("x".join(map(str, s)) for s in kind.shapes)
        raise ValueError(f"{topology} has no slice {slice_text!r}; valid slices: {valid}")
    if kind.interconnect == "switch":
        return PodSlice(kind, shape, (False,))
    wrap = tuple(d == f for d, f in zip(shape, kind.full_dims))
    return PodSlice(kind, shape, wrap)


def _example(kind: PodKind) -> str:
    if kind.shapes:
        return "x".join(map(str, kind.shapes[min(1, len(kind.shapes) - 1)]))
    return "4x4x4" if kind.ndim == 3 else "8"


def parse_slice(text: str) -> PodSlice:
    """Parse ``'tpu-v3:4x4'``, ``'tpu-v4:2x2x4'``, ``'gpu-h100:8'``, ``'cpu:8'``."""
    topology, sep, shape = text.partition(":")
    if not sep or not shape:
        raise ValueError(f"pod slice {text!r} is not of the form TOPOLOGY:SHAPE (e.g. tpu-v3:4x4)")
    return get_slice(topology.strip(), shape.strip())


def device_coords(pod: PodSlice, device: int) -> tuple[int, ...]:
    """Physical coordinates of logical device ``device`` (row-major over the slice shape).

    The simulated mesh lists devices in this order (``parallel.mesh.build_mesh``), so a mesh axis
    of contiguous devices lies along the innermost physical dims.
    """
    coords = []
    for d in reversed(pod.shape):
        coords.append(device % d)
        device //= d
    return tuple(reversed(coords))
