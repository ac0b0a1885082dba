"""Tasks, the temperature-sampled task mixture, and deterministic global batches.

A `Task` is a name, a kind ("lm" | "translate"), a tag (`<2de>`, `<lm>`) whose id is the first
source token of each of its rows, and its train/valid/test rows (token stores or arrays).

`Batcher` builds the global batch of step `s` from (seed, s) alone, so a resumed run sees exactly
the data it would have seen, and each process can build and read only its own rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moe.data.sources import Example, SourceStats
from moe.data.vocab import BOS_ID

SPLITS = ("train", "valid", "test")
Batch = dict[str, np.ndarray]


class Rows(Protocol):
    """What a task split needs from its storage (`TokenStore`, `ArrayRows`)."""

    @property
    def num_rows(self) -> int: ...

    @property
    def widths(self) -> tuple[int, int]: ...

    def read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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


class Batcher:
    """Deterministic mixture batches of global size `batch_size` with widths (Ls, Lt).

    Row r of step s: task ~ mixture_probabilities(train sizes, temperature, weights), example ~
    uniform over that task's train split, both drawn from numpy's Generator seeded by
    (seed, s). Batch arrays (int32): `src` [B, Ls] (task tag first), `tgt_in` [B, Lt] (bos +
    target shifted right), `tgt_out` [B, Lt] (target + eos; 0 = pad, mask the loss with
    tgt_out != 0), `task` [B] (index into `tasks`).
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
    ):
        if not tasks:
            raise ValueError("Batcher needs at least one task")
        self.tasks = tuple(tasks)
        self.batch_size, self.seed = batch_size, seed
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

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(task index int32 [B], train row index int64 [B]) of step `step`, from (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        task_ids = rng.choice(len(self.tasks), size=self.batch_size, p=self.probabilities)
        rows = rng.integers(0, self.train_sizes[task_ids])
        return task_ids.astype(np.int32), rows

    def global_batch(self, step: int) -> Batch:
        return self.process_batch(step, 0, 1)

    def process_batch(self, step: int, process_index: int, process_count: int) -> Batch:
        """Rows [i*B/P, (i+1)*B/P) of the global batch of `step`; reads only those rows."""
        lo, hi = _process_slice(self.batch_size, process_index, process_count)
        task_ids, rows = self.plan(step)
        return self._assemble(task_ids[lo:hi], rows[lo:hi], "train")

    def eval_batches(
        self,
        task: int | str,
        split: str,
        batch_size: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Every row of one task's split in order, `batch_size` rows a batch (this process's part).

        The last batch is padded to full size by repeating its first row; `mask` bool [B] is False
        on the padding rows.
        """
        t = self._task_index(task)
        lo, hi = _process_slice(batch_size, process_index, process_count)
        n = self.tasks[t].size(split)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            mask = np.zeros((batch_size,), bool)
            mask[: len(rows)] = True
            rows = np.concatenate([rows, np.full((batch_size - len(rows),), start)])  # [B]
            task_ids = np.full((batch_size,), t, np.int32)
            batch = self._assemble(task_ids[lo:hi], rows[lo:hi], split)
            batch["mask"] = mask[lo:hi]
            yield batch

    def _task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            names = [t.name for t in self.tasks]
            if task not in names:
                raise KeyError(f"no task named {task!r} (tasks: {', '.join(names)})")
            return names.index(task)
        return int(task)

    def _assemble(self, task_ids: np.ndarray, rows: np.ndarray, split: str) -> Batch:
        ls, lt = self.widths
        b = len(task_ids)
        src = np.zeros((b, ls), np.int32)  # [b, Ls]
        tgt = np.zeros((b, lt), np.int32)  # [b, Lt]
        for t in np.unique(task_ids):
            where = np.flatnonzero(task_ids == t)
            s, g = self.tasks[t].splits[split].read_rows(rows[where])
            src[where, : s.shape[1]] = s
            tgt[where, : g.shape[1]] = g
        tgt_in = np.concatenate([np.full((b, 1), BOS_ID, np.int32), tgt[:, :-1]], axis=1)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt, "task": task_ids.astype(np.int32)}


def _process_slice(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per
