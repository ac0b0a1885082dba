"""The input pipeline: task specs -> sources -> splits -> vocabulary -> token stores -> batches.

    specs --load_source--> examples (deduplicated, length-filtered; `sources.py`)
          --split_of-->    train / valid / test, by a hash of the example
          --train_vocab--> one SentencePiece model over every task's train text + task tags
          --cached_store-> a token store per task and split (`token_store.py`)

Everything derived is cached under `cache_dir` by content hash, so a second run (or a second
process on the same host) loads instead of rebuilding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moe.config import Experiment
from moe.data.sources import DEFAULT_LOCALE_ROOT, DataError, Example, SourceStats, load_source
from moe.data.tasks import SPLITS, Batcher, Task
from moe.data.token_store import cached_store
from moe.data.vocab import Vocab, train_vocab

__all__ = [
    "DataError",
    "PreparedData",
    "RunData",
    "TaskSpec",
    "build_tasks",
    "prepare",
    "split_of",
    "task_specs",
    "task_tag",
]


def split_of(example: Example, valid_fraction: float, test_fraction: float) -> str:
    """The split ("train", "valid" or "test") of `example`, from blake2b of its key text.

    The key is the source text, or the target text for LM examples (src == ""): the same English
    sentence lands in the same split in every task that uses it (en->de, en->fr, English LM), so
    no test sentence is seen in training by another task. Independent of Python's hash seed.
    """
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must be >= 0 "
            "with a sum below 1"
        )
    u = _hash_unit(_key(example))
    if u < test_fraction:
        return "test"
    return "valid" if u < test_fraction + valid_fraction else "train"


def _key(example: Example) -> str:
    return example.src if example.src else example.tgt


def _hash_unit(text: str) -> float:
    """blake2b of `text` mapped to [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True)
class TaskSpec:
    """What a config says about one task.

    target_lang names the tag `<2xx>` of a translate task (default: <lang> of `gettext:<lang>`,
    else the task name). weight multiplies the task's share in the mixture; max_examples caps the
    train split (a hash-chosen subset, so the same examples every run).
    """

    name: str
    kind: str  # "lm" | "translate"
    source: str  # gettext:<lang> | text:<path> | parallel:<a>,<b> | tsv:<path>
    target_lang: str | None = None
    weight: float = 1.0
    max_examples: int | None = None


@dataclass(frozen=True)
class PreparedData:
    tasks: tuple[Task, ...]
    vocab: Vocab
    notes: tuple[str, ...]  # one line each, for the log: fallback used, malformed lines, ...


def task_tag(spec: TaskSpec) -> str:
    """`<lm>` for LM tasks, `<2xx>` for translation into language xx (see TaskSpec)."""
    if spec.kind == "lm":
        return "<lm>"
    lang = spec.target_lang
    if lang is None and spec.source.startswith("gettext:"):
        lang = spec.source.partition(":")[2]
    return f"<2{lang or spec.name}>"


def build_tasks(
    specs: Sequence[TaskSpec],
    *,
    cache_dir: str | Path,
    vocab_size: int,
    max_src_len: int,
    max_tgt_len: int,
    max_chars: int | None = None,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    locale_root: str | Path = DEFAULT_LOCALE_ROOT,
    vocab_model_type: str = "bpe",
    normalization: str = "nfkc",
    say: Callable[..., None] = lambda *a, **k: None,
) -> PreparedData:
    """Read, split, tokenise and store every task; see the module docstring. ``say`` gets a
    line with the duration of each phase (sources, vocabulary, token stores).

    Raises DataError (one line) for bad sources, duplicate task names, or a task whose train
    split is empty. Empty valid/test splits are allowed and noted.
    """
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise DataError(f"tasks must be a non-empty list with unique names; got {names}")
    tags = [task_tag(s) for s in specs]
    loaded: list[tuple[dict[str, list[Example]], SourceStats]] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for spec in specs:
        examples, stats = load_source(
            spec.source, kind=spec.kind, locale_root=locale_root, max_chars=max_chars
        )
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for e in examples:
            splits[split_of(e, valid_fraction, test_fraction)].append(e)
        if spec.max_examples is not None:
            splits["train"] = _cap(splits["train"], spec.max_examples)
        if not splits["train"]:
            raise DataError(f"task {spec.name!r} ({spec.source}): no examples in the train split")
        loaded.append((splits, stats))
        notes.extend(_notes(spec, stats, splits))
    count = sum(len(ex) for splits, _ in loaded for ex in splits.values())
    say(f"moe: read {len(specs)} task source(s), {count:,} examples, in {_since(t0)}")
    t0 = time.perf_counter()
    vocab = train_vocab(
        _vocab_texts(loaded),
        vocab_size,
        Path(cache_dir) / "vocab",
        user_symbols=sorted(set(tags)),
        model_type=vocab_model_type,
        normalization=normalization,
    )
    say(f"moe: vocabulary of {vocab.size:,} pieces in {_since(t0)}")
    t0 = time.perf_counter()
    tasks = []
    for spec, tag, (splits, stats) in zip(specs, tags, loaded):
        tag_id = vocab.piece_to_id(tag)
        stores = {
            split: cached_store(
                Path(cache_dir) / "stores",
                f"{spec.name}-{split}",
                examples,
                vocab,
                kind=spec.kind,
                tag_id=tag_id,
                max_src_len=max_src_len,
                max_tgt_len=max_tgt_len,
            )
            for split, examples in splits.items()
        }
        heldout = {split: splits[split] for split in ("valid", "test")}
        tasks.append(Task(spec.name, spec.kind, tag, tag_id, stores, spec.weight, stats, heldout))
    say(f"moe: token stores of {len(tasks) * len(SPLITS)} task splits in {_since(t0)}")
    return PreparedData(tuple(tasks), vocab, tuple(notes))


def _since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def _cap(examples: list[Example], limit: int) -> list[Example]:
    """The `limit` examples with the smallest hash, in their original order."""
    if len(examples) <= limit:
        return examples
    rank = sorted(range(len(examples)), key=lambda i: _hash_unit(_key(examples[i])))
    keep = set(rank[:limit])
    return [e for i, e in enumerate(examples) if i in keep]


def _vocab_texts(loaded) -> list[str]:
    """Every distinct non-empty train text, in task order (English shared by tasks counts once)."""
    texts: dict[str, None] = {}
    for splits, _ in loaded:
        for e in splits["train"]:
            texts.setdefault(e.src)
            texts.setdefault(e.tgt)
    texts.pop("", None)
    return list(texts)


def _notes(spec: TaskSpec, stats: SourceStats, splits: dict[str, list[Example]]) -> list[str]:
    notes = []
    if stats.fallback_used:
        notes.append(
            f"task {spec.name!r}: no gettext catalogues for {spec.source}; using the built-in "
            f"fallback corpus ({stats.examples} examples)"
        )
    if stats.malformed:
        notes.append(
            f"task {spec.name!r}: skipped {stats.malformed} malformed entries in "
            f"{spec.source} (first: {', '.join(stats.malformed_at)})"
        )
    for split in ("valid", "test"):
        if not splits[split]:
            notes.append(f"task {spec.name!r}: the {split} split is empty")
    return notes


# The run's input: the experiment -> ready tasks and the batcher.


@dataclasses.dataclass
class RunData:
    """A run's ready input: tasks, the shared vocabulary, and the batcher of training steps."""

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
        """Up to ``limit`` global batches of one task's split, in order (empty rows, if any, hold
        no target: no loss)."""
        yield from itertools.islice(self.batcher.eval_batches(ti, split, batch_size), limit)

    def references(
        self, ti: int, split: str, n: int, seed: int | None = None
    ) -> tuple[list[str], list[str], np.ndarray]:
        """``n`` examples of a split: source texts, reference texts, source tokens. ``seed``
        given: a random sample of ``n`` (the same for a seed; in split order), else the first
        ``n`` (a split's order is its sources', e.g. alphabetical for gettext catalogues)."""
        pool = self.tasks[ti].examples.get(split, [])
        rows = np.arange(min(n, len(pool)))
        if seed is not None and len(pool) > n:
            rows = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
        if not len(rows):
            return [], [], np.zeros((0, self.batcher.widths[0]), np.int32)
        examples = [pool[i] for i in rows]
        src, _ = self.tasks[ti].splits[split].read_rows(rows)
        tokens = np.zeros((len(examples), self.batcher.widths[0]), np.int32)
        tokens[:, : src.shape[1]] = src
        return [e.src for e in examples], [e.tgt for e in examples], tokens


def task_specs(exp: Experiment) -> list[TaskSpec]:
    """The experiment's tasks as TaskSpecs (``task_tag`` of one gives its tag in the vocabulary)."""
    return [
        TaskSpec(t.name, t.kind, t.source, weight=t.weight, max_examples=t.max_examples)
        for t in exp.tasks
    ]


def prepare(exp: Experiment, say: Callable[..., None] = print) -> RunData:
    specs = task_specs(exp)

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
            normalization=exp.data.normalization,
            say=say,
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
        pack=exp.train.pack,
        temperature=exp.mixture.temperature,
    )
    return RunData(prepared.tasks, prepared.vocab, batcher, prepared.notes)
