"""Tasks, the temperature-sampled task mixture, and deterministic global batches.

A `Task` is a name, a kind ("lm" | "translate"), a tag (`<2de>`, `<lm>`) whose id is the first
source token of each of its rows, and its train/valid/test rows (token stores or arrays).

`Batcher` builds the global batch of step `s` from (seed, s) alone, so a resumed run sees exactly
the data it would have seen, and each process can build and read only its own rows. With
`pack=True` several examples share a row (`moe.data.packing`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moe.data.packing import Layout, assemble, first_fit
from moe.data.sources import Example, SourceStats

SPLITS = ("train", "valid", "test")
Batch = dict[str, np.ndarray]


class Rows(Protocol):
    """What a task split needs from its storage (`TokenStore`, `ArrayRows`)."""

    @property
    def num_rows(self) -> int: ...

    @property
    def widths(self) -> tuple[int, int]: ...

    def read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def read_lengths(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class Task:
    """One task of the mixture. `splits` maps "train" (required), "valid", "test" to rows."""

    name: str
    kind: str  # "lm" | "translate"
    tag: str  # "<lm>", "<2de>", ...
    tag_id: int
    splits: Mapping[str, Rows]
    weight: float = 1.0  # multiplies the task's share before tempering
    stats: SourceStats | None = field(default=None)
    # Raw held-out examples ("valid", "test"), in row order: the references BLEU is scored on.
    examples: Mapping[str, Sequence[Example]] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("lm", "translate"):
            raise ValueError(
                f"task {self.name!r}: kind={self.kind!r}, expected 'lm' or 'translate'"
            )
        if "train" not in self.splits:
            raise ValueError(f"task {self.name!r}: no train split")

    def size(self, split: str = "train") -> int:
        rows = self.splits.get(split)
        return 0 if rows is None else rows.num_rows


def mixture_probabilities(
    sizes: Sequence[int], temperature: float = 5.0, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Task sampling probabilities q_i ∝ (w_i p_i)^(1/T), p_i = n_i / Σ_k n_k.

    Temperature sampling of Arivazhagan et al. 2019 as used by Task-MoE (Kudugunta et al. 2021
    §4.1; papers.md §9): T=1 follows the data, T -> inf is uniform, T=5 is the standard choice.
    `weights` (default 1) are extra per-task multipliers; a task with weight 0 is never sampled.
    Returns float64 [num_tasks] summing to 1.
    """
    n = np.asarray(sizes, np.float64)
    w = np.ones_like(n) if weights is None else np.asarray(weights, np.float64)
    if n.ndim != 1 or n.size == 0 or w.shape != n.shape:
        raise ValueError(f"sizes {n.shape} and weights {w.shape} must be equal non-empty vectors")
    if np.any(n <= 0) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"sizes must be > 0 and weights >= 0 with one > 0; got {sizes}, {weights}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    mass = w * n / n.sum()  # w_i p_i
    if math.isinf(temperature):
        q = (mass > 0).astype(np.float64)
    else:
        with np.errstate(divide="ignore"):
            logits = np.log(mass) / temperature  # log of (w_i p_i)^(1/T); -inf for w_i = 0
        q = np.exp(logits - logits.max())
    return q / q.sum()


@dataclass(frozen=True)
class StepPlan:
    """The examples of one global batch and where they go: ``task`` int32 [N], ``row`` int64 [N]
    (index into the task's train split), their lengths and ``layout`` (``moe.data.packing``)."""

    task: np.ndarray
    row: np.ndarray
    src_len: np.ndarray
    tgt_len: np.ndarray
    layout: Layout


class Batcher:
    """Deterministic mixture batches of global size `batch_size` rows with widths (Ls, Lt).

    Examples are drawn from numpy's Generator seeded by (seed, s): task ~
    mixture_probabilities(train sizes, temperature, weights), example ~ uniform over that task's
    train split. Unpacked, row r of step s holds the r-th draw; packed (`pack=True`), draws are
    placed first fit until the rows are full (`moe.data.packing.first_fit`). Batch arrays are
    `moe.data.packing.BATCH_KEYS` (int32 [B, L]; 0 = padding; mask the loss with tgt_out != 0).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        batch_size: int,
        max_src_len: int,
        max_tgt_len: int,
        seed: int,
        temperature: float = 5.0,
        pack: bool = False,
    ):
        if not tasks:
            raise ValueError("Batcher needs at least one task")
        self.tasks = tuple(tasks)
        self.batch_size, self.seed, self.pack = batch_size, seed, pack
        self.widths = (max_src_len, max_tgt_len)
        for task in self.tasks:
            for split, rows in task.splits.items():
                if rows.widths[0] > max_src_len or rows.widths[1] > max_tgt_len:
                    raise ValueError(
                        f"task {task.name!r} {split}: rows are {rows.widths} wide, more than the "
                        f"batch widths ({max_src_len}, {max_tgt_len})"
                    )
        self.train_sizes = np.array([t.size("train") for t in self.tasks], np.int64)
        weights = [t.weight for t in self.tasks]
        self.probabilities = mixture_probabilities(self.train_sizes, temperature, weights)
        self._lengths: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._last_plan: tuple[int, StepPlan] | None = None  # a step's plan is asked for twice

    def lengths(self, task: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(src_len, tgt_len) int32 [n] of every example of a task's split (read once)."""
        key = (task, split)
        if key not in self._lengths:
            rows = self.tasks[task].splits.get(split)
            n = 0 if rows is None else rows.num_rows
            self._lengths[key] = (
                rows.read_lengths(np.arange(n)) if n else (np.zeros(0, np.int32),) * 2
            )
        return self._lengths[key]

    def plan(self, step: int) -> StepPlan:
        """The examples of step `step` and their places, from (seed, step) alone."""
        if self._last_plan is None or self._last_plan[0] != step:
            self._last_plan = (step, self._plan(step))
        return self._last_plan[1]

    def _plan(self, step: int) -> StepPlan:
        rng = np.random.default_rng([self.seed, step])

        def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
            task_ids = rng.choice(len(self.tasks), size=n, p=self.probabilities)
            return task_ids.astype(np.int32), rng.integers(0, self.train_sizes[task_ids])

        task, row = draw(self.batch_size)
        src_len, tgt_len = self._example_lengths(task, row)
        if not self.pack:
            return StepPlan(task, row, src_len, tgt_len, Layout.one_per_row(self.batch_size))
        tasks, rows = [task], [row]

        def more():
            t, r = draw(self.batch_size)
            tasks.append(t)
            rows.append(r)
            return self._example_lengths(t, r)

        taken, layout = first_fit(src_len, tgt_len, self.batch_size, self.widths, more)
        task, row = np.concatenate(tasks)[taken], np.concatenate(rows)[taken]
        src_len, tgt_len = self._example_lengths(task, row)
        return StepPlan(task, row, src_len, tgt_len, layout)

    def _example_lengths(self, task: np.ndarray, row: np.ndarray):
        src, tgt = np.zeros(len(task), np.int32), np.zeros(len(task), np.int32)
        for t in np.unique(task):
            where = np.flatnonzero(task == t)
            s, g = self.lengths(int(t), "train")
            src[where], tgt[where] = s[row[where]], g[row[where]]
        return src, tgt

    def global_batch(self, step: int) -> Batch:
        return self.process_batch(step, 0, 1)

    def process_batch(self, step: int, process_index: int, process_count: int) -> Batch:
        """Rows [i*B/P, (i+1)*B/P) of the global batch of `step`; reads only their examples."""
        lo, hi = _process_slice(self.batch_size, process_index, process_count)
        return self._rows(self.plan(step), lo, hi, "train")

    def eval_batches(
        self,
        task: int | str,
        split: str,
        batch_size: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Every example of one task's split, in order, `batch_size` rows a batch (packed if the
        batcher packs; this process's rows). Rows of the last batch may be empty (all 0)."""
        t = self._task_index(task)
        lo, hi = _process_slice(batch_size, process_index, process_count)
        src_len, tgt_len = self.lengths(t, split)
        start = 0
        while start < len(src_len):
            if self.pack:  # first fit over the next examples, up to the first that fits no row
                window = slice(start, start + 64 * batch_size)
                taken, layout = first_fit(
                    src_len[window], tgt_len[window], batch_size, self.widths, max_misses=1
                )
            else:
                taken = np.arange(min(batch_size, len(src_len) - start))
                layout = Layout.one_per_row(len(taken))
            rows = start + taken
            n = len(rows)
            plan = StepPlan(np.full(n, t, np.int32), rows, src_len[rows], tgt_len[rows], layout)
            yield self._rows(plan, lo, hi, split)
            start += n

    def _task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            names = [t.name for t in self.tasks]
            if task not in names:
                raise KeyError(f"no task named {task!r} (tasks: {', '.join(names)})")
            return names.index(task)
        return int(task)

    def _rows(self, plan: StepPlan, lo: int, hi: int, split: str) -> Batch:
        """Batch rows [lo, hi) of a plan: read their examples and assemble the arrays."""
        mine = np.flatnonzero((plan.layout.slot >= lo) & (plan.layout.slot < hi))
        src, tgt = [None] * len(mine), [None] * len(mine)
        for t in np.unique(plan.task[mine]):
            where = np.flatnonzero(plan.task[mine] == t)
            idx = mine[where]
            s, g = self.tasks[t].splits[split].read_rows(plan.row[idx])
            for j, i in enumerate(where):
                src[i] = s[j, : plan.src_len[idx[j]]]
                tgt[i] = g[j, : plan.tgt_len[idx[j]]]
        layout = Layout(
            plan.layout.slot[mine] - lo,
            plan.layout.src_offset[mine],
            plan.layout.tgt_offset[mine],
            plan.layout.segment[mine],
        )
        return assemble(hi - lo, self.widths, layout, src, tgt, plan.task[mine])


def _process_slice(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per
