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
import functools
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
from moe.data import multilingual
from moe.data.sources import DEFAULT_LOCALE_ROOT, DataError, Example, SourceStats
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


@functools.lru_cache(maxsize=1 << 21)  # tasks of one language pair share their English side
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
    reverse: bool = False  # translate the source's second side into its first (xx -> en)

    @property
    def languages(self) -> tuple[str, str]:
        """(source language, target language): ``multilingual.side_languages``."""
        return multilingual.side_languages(self.name, self.kind, self.source, self.reverse)


@dataclass(frozen=True)
class PreparedData:
    tasks: tuple[Task, ...]
    vocab: Vocab
    notes: tuple[str, ...]  # one line each, for the log: fallback used, malformed lines, ...
    unk_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # per language


def task_tag(spec: TaskSpec) -> str:
    """`<lm>` for LM tasks, `<2xx>` for translation into language xx (see TaskSpec)."""
    if spec.kind == "lm":
        return "<lm>"
    lang = spec.target_lang
    if lang is None and spec.reverse and spec.source.startswith("gettext:"):
        lang = "en"
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
    max_heldout: int | None = None,
    vocab_per_language: int | None = None,
    character_coverage: float = 1.0,
    say: Callable[[str], None] | None = None,
) -> PreparedData:
    """Read, split, tokenise and store every task; see the module docstring. ``say`` gets a
    line with the duration of each phase (sources, vocabulary, token stores).

    Distinct sources are read once, in parallel when there are many (``multilingual``).
    ``max_heldout`` keeps a fixed hash-chosen subset of each valid/test split; held-out
    examples are in hash order, so the first ``n`` (BLEU's references) are a fixed random
    subset. ``vocab_per_language`` caps each language's texts in the vocabulary sample.
    Raises DataError (one line) for bad sources, duplicate task names, or a task whose train
    split is empty. Empty valid/test splits are allowed and noted.
    """
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise DataError(f"tasks must be a non-empty list with unique names; got {names}")
    tags = [task_tag(s) for s in specs]
    tell = say or (lambda line: None)
    t0 = time.perf_counter()
    read = multilingual.load_sources(
        [(s.source, s.kind) for s in specs],
        locale_root=locale_root,
        max_chars=max_chars,
        say=say,
        cache_dir=Path(cache_dir),
    )
    loaded: list[tuple[dict[str, list[Example]], SourceStats]] = []
    notes: list[str] = []
    by_lang: dict[str, list[str]] = {}
    for spec in specs:
        examples, stats = read[(spec.source, spec.kind)]
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for e in examples:  # split by the English side, before any reversal
            splits[split_of(e, valid_fraction, test_fraction)].append(e)
        if spec.max_examples is not None:
            splits["train"] = _cap(splits["train"], spec.max_examples)
        for split in ("valid", "test"):
            splits[split] = _cap(splits[split], max_heldout, ordered=True)
        if spec.reverse:
            splits = {k: [Example(e.tgt, e.src) for e in v] for k, v in splits.items()}
        if not splits["train"]:
            raise DataError(f"task {spec.name!r} ({spec.source}): no examples in the train split")
        loaded.append((splits, stats))
        notes.extend(_notes(spec, stats, splits))
        multilingual.add_texts(by_lang, spec.languages, splits["train"])
    count = sum(len(ex) for splits, _ in loaded for ex in splits.values())
    tell(f"read {len(specs)} task source(s), {count:,} examples, in {_since(t0)}")
    t0 = time.perf_counter()
    texts = (
        _vocab_texts(loaded)
        if vocab_per_language is None
        else multilingual.vocab_sample(by_lang, vocab_per_language)
    )
    vocab = train_vocab(
        texts,
        vocab_size,
        Path(cache_dir) / "vocab",
        user_symbols=sorted(set(tags)),
        model_type=vocab_model_type,
        normalization=normalization,
        character_coverage=character_coverage,
    )
    tell(f"vocabulary of {vocab.size:,} pieces in {_since(t0)}")
    t0 = time.perf_counter()
    heldout_texts: dict[str, list[str]] = {}
    for spec, (splits, _) in zip(specs, loaded):
        multilingual.add_texts(heldout_texts, spec.languages, splits["valid"] + splits["test"])
    unk_rates = multilingual.unknown_rates(vocab, heldout_texts)
    tasks = []
    for i, (spec, tag, (splits, stats)) in enumerate(zip(specs, tags, loaded)):
        if say and len(specs) >= multilingual.PARALLEL_FROM and (i + 1) % 20 == 0:
            say(f"data: token stores of {i + 1}/{len(specs)} tasks")
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
    tell(f"token stores of {len(tasks) * len(SPLITS)} task splits in {_since(t0)}")
    return PreparedData(tuple(tasks), vocab, tuple(notes), unk_rates)


def _since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def _cap(examples: list[Example], limit: int | None, ordered: bool = False) -> list[Example]:
    """The `limit` examples (None: all) with the smallest hash, in their original order, or
    with `ordered` in hash order (a fixed random order)."""
    rank = sorted(range(len(examples)), key=lambda i: (_hash_unit(_key(examples[i])), i))
    if ordered:
        return [examples[i] for i in rank[:limit]]
    if limit is None or len(examples) <= limit:
        return examples
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
    unk_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # per language
    languages: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # per task

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
            if t.name in self.languages:
                src, tgt = self.languages[t.name]
                lang = tgt if src == "en" else src  # the non-English side (or English)
                row.update(language=lang, unk_rate=self.unk_rates.get(lang))
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
        TaskSpec(
            t.name,
            t.kind,
            t.source,
            weight=t.weight,
            max_examples=t.max_examples,
            reverse=t.reverse,
        )
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
            max_heldout=exp.eval.max_examples,
            vocab_per_language=exp.data.vocab_per_language,
            character_coverage=exp.data.character_coverage,
            say=lambda line: say(f"moe: {line}"),
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
    many = len(prepared.tasks) > 12
    for task in prepared.tasks if not many else ():
        say(
            f"moe: task {task.name}: {task.size('train')} train / {task.size('valid')} valid / "
            f"{task.size('test')} test examples"
        )
    if many:
        sizes = sorted((t.size("train"), t.name) for t in prepared.tasks)
        say(
            f"moe: {len(sizes)} tasks, train examples {sizes[0][0]} ({sizes[0][1]}) .. "
            f"{sizes[-1][0]} ({sizes[-1][1]}), {sum(n for n, _ in sizes)} in all"
        )
    if len(prepared.unk_rates) > 1:
        worst = sorted(prepared.unk_rates.items(), key=lambda kv: -kv[1])[:3]
        say("moe: vocabulary <unk> rate, worst languages: " + ", ".join(
            f"{lang} {rate:.2%}" for lang, rate in worst
        ))  # fmt: skip
    batcher = Batcher(
        prepared.tasks,
        batch_size=exp.train.batch_size,
        max_src_len=exp.model.max_source_length,
        max_tgt_len=exp.model.max_target_length,
        seed=exp.train.seed,
        pack=exp.train.pack,
        temperature=exp.mixture.temperature,
    )
    languages = {s.name: s.languages for s in specs}
    return RunData(
        prepared.tasks, prepared.vocab, batcher, prepared.notes, prepared.unk_rates, languages
    )
