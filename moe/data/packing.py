"""Packing several examples into one batch row (T5X/seqio style), and the row arrays it gives.

A batch row of width ``(Ls, Lt)`` holds examples side by side: example ``k`` of a row occupies
``src[off_s : off_s + len_s]`` and ``tgt[off_t : off_t + len_t]`` and carries segment id ``k``
(1-based; 0 is padding) in both, positions that restart at 0, and its task id on every token.
The model keeps examples apart with the segment ids (attention never crosses them, see
``moe.layers.transformer``); the loss is per token, so per-example and per-task sums are the
same as without packing. An unpacked batch is the special case of one example per row.

Placement is first fit: each example, in order, goes to the first row where both its source and
its target still fit. It only needs the examples' lengths, so every process plans the whole
global batch without reading a token and then reads the examples of its own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from moe.data.vocab import BOS_ID

# Row arrays of a batch, all int32 [B, L]; see the module docstring.
BATCH_KEYS = (
    "src",
    "tgt_in",
    "tgt_out",
    "src_segment",
    "tgt_segment",
    "src_position",
    "tgt_position",
    "src_task",
    "tgt_task",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where N examples go in a batch: ``slot`` (row), offsets and segment id, int32 [N]."""

    slot: np.ndarray
    src_offset: np.ndarray
    tgt_offset: np.ndarray
    segment: np.ndarray

    @classmethod
    def one_per_row(cls, n: int) -> Layout:
        zero = np.zeros(n, np.int32)
        return cls(np.arange(n, dtype=np.int32), zero, zero, np.ones(n, np.int32))


def first_fit(
    src_len: np.ndarray,
    tgt_len: np.ndarray,
    rows: int,
    widths: tuple[int, int],
    draw: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    max_misses: int = 8,
) -> tuple[np.ndarray, Layout]:
    """Pack examples first fit into ``rows`` rows of ``widths = (Ls, Lt)``.

    Args:
      src_len, tgt_len: int [N] lengths of the candidate examples, in order.
      rows: B.
      widths: (Ls, Lt); every example must fit an empty row.
      draw: optional; called for more candidates ``(src_len, tgt_len)`` when these run out
        (training draws from the mixture until the rows are full); None: pack the given ones
        (evaluation: every example must be placed, so the caller gives at most what fits).
      max_misses: stop after this many candidates that fit no row (the rows are then nearly
        full); an example that misses is skipped, not kept for later.

    Returns:
      ``(taken, layout)``: the indices of the placed candidates (into the concatenation of the
      given and the drawn ones) and where they went, in placement order.
    """
    free_s = np.full(rows, widths[0], np.int64)
    free_t = np.full(rows, widths[1], np.int64)
    count = np.zeros(rows, np.int32)
    taken, slot, off_s, off_t, seg = [], [], [], [], []
    s_all, t_all, misses, i = np.asarray(src_len), np.asarray(tgt_len), 0, 0
    while misses < max_misses:
        if i == len(s_all):
            if draw is None:
                break
            more_s, more_t = draw()
            s_all, t_all = np.concatenate([s_all, more_s]), np.concatenate([t_all, more_t])
        s, t = s_all[i], t_all[i]
        if s > widths[0] or t > widths[1]:
            raise ValueError(f"example of lengths ({s}, {t}) is wider than the rows {widths}")
        fits = np.flatnonzero((free_s >= s) & (free_t >= t))
        if fits.size:
            r = fits[0]
            taken.append(i)
            slot.append(r)
            off_s.append(widths[0] - free_s[r])
            off_t.append(widths[1] - free_t[r])
            count[r] += 1
            seg.append(count[r])
            free_s[r] -= s
            free_t[r] -= t
        else:
            misses += 1
        i += 1
    as32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return np.asarray(taken, np.int64), Layout(as32(slot), as32(off_s), as32(off_t), as32(seg))


def assemble(
    rows: int,
    widths: tuple[int, int],
    layout: Layout,
    src: list[np.ndarray],
    tgt: list[np.ndarray],
    task: np.ndarray,
) -> dict[str, np.ndarray]:
    """The batch arrays (``BATCH_KEYS``) of ``rows`` rows from the examples' tokens.

    ``src[i]``, ``tgt[i]``: the tokens of example i without padding (``tgt`` ends with eos);
    ``task[i]`` its task id. ``tgt_in`` is bos followed by the target shifted right, within
    each example; ``tgt_out`` the target; 0 is padding everywhere.
    """
    ls, lt = widths
    out = {k: np.zeros((rows, ls if k.startswith("src") else lt), np.int32) for k in BATCH_KEYS}
    for i, (s, g) in enumerate(zip(src, tgt)):
        r, a, b = layout.slot[i], layout.src_offset[i], layout.tgt_offset[i]
        out["src"][r, a : a + len(s)] = s
        out["src_segment"][r, a : a + len(s)] = layout.segment[i]
        out["src_position"][r, a : a + len(s)] = np.arange(len(s))
        out["src_task"][r, a : a + len(s)] = task[i]
        out["tgt_out"][r, b : b + len(g)] = g
        out["tgt_in"][r, b] = BOS_ID
        out["tgt_in"][r, b + 1 : b + len(g)] = g[:-1]
        out["tgt_segment"][r, b : b + len(g)] = layout.segment[i]
        out["tgt_position"][r, b : b + len(g)] = np.arange(len(g))
        out["tgt_task"][r, b : b + len(g)] = task[i]
    return out


def strip(row: np.ndarray) -> np.ndarray:
    """A padded row's tokens up to its last non-zero (the example without padding)."""
    nz = np.flatnonzero(row)
    return row[: nz[-1] + 1] if nz.size else row[:0]
