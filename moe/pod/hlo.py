"""What a compiled XLA program costs, read from the program itself.

``program_cost(compiled)`` takes a ``jax.jit(...).lower(...).compile()`` result and returns its
per-device FLOPs and bytes accessed (XLA's ``cost_analysis``), the collectives in its HLO text
(kind, payload bytes per device, replica groups) and the number of kernels the entry
computation launches. ``pod/cost.py`` turns these into time on a pod slice.

Limits: instructions inside ``while`` bodies (``lax.scan``/``fori_loop``) are counted once,
not once per iteration; async collective pairs are counted at their ``-start``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)"
    r"\((?P<args>[^)]*)\)"
)
_MATMUL_MARKS = ("dot_general", "__ynn", "__onednn", "matmul", "convolution")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launched instruction of the entry computation: bytes it reads and writes (operands
    plus result) and whether it is a matrix multiply (compute-bound) or not (memory-bound)."""

    op: str
    bytes: int
    matmul: bool


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective in the program.

    kind: one of COLLECTIVES. bytes: payload per device, by kind: all-to-all the buffer each
    device sends (= receives, its own share included); all-reduce the reduced buffer;
    all-gather the gathered (output) buffer; reduce-scatter the input buffer (the output is
    ``bytes / group_size``); collective-permute the buffer sent. group: the device ids of the
    first replica group (all groups have this size); num_groups: how many groups.
    """

    kind: str
    bytes: int
    group: tuple[int, ...]
    num_groups: int

    @property
    def group_size(self) -> int:
        return len(self.group)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per-device cost of one execution of a compiled SPMD program."""

    flops: float
    bytes_accessed: float
    transcendentals: float
    collectives: tuple[Collective, ...]
    kernels: tuple[Kernel, ...]
    num_devices: int

    @property
    def num_kernels(self) -> int:
        return len(self.kernels)

    def bytes_by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(COLLECTIVES, 0)
        for c in self.collectives:
            out[c.kind] += c.bytes
        return out


def shape_bytes(text: str) -> int:
    """Bytes of all arrays in an HLO shape string (``f32[2,3]{1,0}`` or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """Replica groups of an HLO collective line (explicit ``{{0,1},{2,3}}`` or iota
    ``[2,4]<=[4,2]T(1,0)`` form; empty means one group of every device)."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        shape = [int(v) for v in m[1].split(",")]
        dims = [int(v) for v in m[2].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m[3]:
            ids = ids.transpose([int(v) for v in m[3].split(",")])
        return ids.reshape(shape).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m and m[1]:
        return [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}", m[1])]
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        pairs = re.findall(r"\{(\d+),(\d+)\}", m[1])
        return [[int(a), int(b)] for a, b in pairs][:1] * max(1, len(pairs))
    return [list(range(num_devices))]


def parse_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective instruction in ``hlo_text`` (the ``-done`` halves are skipped)."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        groups = replica_groups(line, num_devices)
        size = shape_bytes(m["shape"])
        if m["start"] and m["shape"].startswith("(("):  # async: ((operands), output, ...)
            size = shape_bytes(m["shape"].split(")", 1)[1])
        out.append(Collective(m["op"], size, tuple(groups[0]), len(groups)))
    return out


def entry_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the ENTRY computation (not parameters, constants, tuples, bitcasts);
    a ``while`` loop counts as one kernel, its body is not looked into."""
    entry = re.search(r"^ENTRY .*?\{\n(.*?)^\}", hlo_text, re.S | re.M)
    if not entry:
        return []
    sizes: dict[str, int] = {}
    out = []
    for line in entry[1].splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        sizes[m["name"]] = own = shape_bytes(m["shape"])
        if m["op"] in _NOT_KERNELS or m["op"] in COLLECTIVES:
            continue
        operands = sum(sizes.get(n, 0) for n in re.findall(r"%([\w.\-]+)", m["args"]))
        matmul = m["op"] in ("dot", "convolution") or (
            m["op"] in ("fusion", "custom-call") and any(k in line for k in _MATMUL_MARKS)
        )
        out.append(Kernel(m["op"], own + operands, matmul))
    return out


def program_cost(compiled: Any, num_devices: int | None = None) -> ProgramCost:
    """Per-device cost of ``compiled`` (a ``jax.stages.Compiled``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returned one dict per device
        analysis = analysis[0]
    text = compiled.as_text()
    if num_devices is None:
        m = re.search(r"num_partitions=(\d+)", text)
        num_devices = int(m[1]) if m else 1
    return ProgramCost(
        flops=float(analysis.get("flops", 0.0)),
        bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
        transcendentals=float(analysis.get("transcendentals", 0.0)),
        collectives=tuple(parse_collectives(text, num_devices)),
        kernels=tuple(entry_kernels(text)),
        num_devices=num_devices,
    )
