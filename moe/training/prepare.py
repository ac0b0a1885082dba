"""The input pipeline of a run: the experiment's tasks -> ready tasks, vocabulary and batcher.

Every process builds the same (cached) data; the primary builds first so others load the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from moe.config import Experiment
from moe.training.data import TaskSpec, build_tasks
from moe.training.tasks import Batcher, Task
from moe.training.vocab import Vocab


@dataclasses.dataclass
class Data:
    tasks: tuple[Task, ...]
    vocab: Vocab
    batcher: Batcher
    notes: tuple[str, ...]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for t in self.tasks:
            row = {split: t.size(split) for split in ("train", "valid", "test")}
            if t.stats is not None:
                row.update(
                    malformed=t.stats.malformed,
                    duplicates=t.stats.duplicates,
                    too_long=t.stats.too_long,
                    fallback_used=t.stats.fallback_used,
                )
            out[t.name] = row
        return out

    def eval_batches(
        self, ti: int, split: str, batch_size: int, limit: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Global batches of one task's split; padding rows have no targets (no loss)."""
        for i, batch in enumerate(self.batcher.eval_batches(ti, split, batch_size)):
            if i >= limit:
                return
            mask = batch.pop("mask")
            batch["tgt_out"] = np.where(mask[:, None], batch["tgt_out"], 0)
            yield batch

    def references(self, ti: int, split: str, n: int) -> tuple[list[str], list[str], np.ndarray]:
        """The first ``n`` examples of a split: source texts, reference texts, source tokens."""
        examples = self.tasks[ti].examples.get(split, [])[:n]
        if not examples:
            return [], [], np.zeros((0, self.batcher.widths[0]), np.int32)
        rows = np.arange(len(examples))
        src, _ = self.tasks[ti].splits[split].read_rows(rows)
        tokens = np.zeros((len(examples), self.batcher.widths[0]), np.int32)
        tokens[:, : src.shape[1]] = src
        return [e.src for e in examples], [e.tgt for e in examples], tokens


def prepare(exp: Experiment, say: Callable[..., None] = print) -> Data:
    specs = [
        TaskSpec(t.name, t.kind, t.source, weight=t.weight, max_examples=t.max_examples)
        for t in exp.tasks
    ]

    def build():
        return build_tasks(
            specs,
            cache_dir=exp.data.cache_dir,
            vocab_size=exp.model.vocab_size,
            max_src_len=exp.model.max_source_length,
            max_tgt_len=exp.model.max_target_length,
            max_chars=exp.data.max_chars,
            valid_fraction=exp.data.valid_fraction,
            test_fraction=exp.data.test_fraction,
            locale_root=exp.data.locale_dir,
        )

    if jax.process_count() > 1:  # the primary fills the cache, then the others read it
        from jax.experimental import multihost_utils

        prepared = build() if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("moe-data-prepared")
        prepared = prepared or build()
    else:
        prepared = build()
    for note in prepared.notes:
        say(f"moe: {note}")
    for task in prepared.tasks:
        say(
            f"moe: task {task.name}: {task.size('train')} train / {task.size('valid')} valid / "
            f"{task.size('test')} test examples"
        )
    batcher = Batcher(
        prepared.tasks,
        batch_size=exp.train.batch_size,
        max_src_len=exp.model.max_source_length,
        max_tgt_len=exp.model.max_target_length,
        seed=exp.train.seed,
        temperature=exp.mixture.temperature,
    )
    return Data(prepared.tasks, prepared.vocab, batcher, prepared.notes)
