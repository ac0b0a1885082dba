"""Hash splits (stable across processes and hash seeds) and the spec -> tasks pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
from tinyrun import tiny_config

from moe import config as cfg
from moe.data.pipeline import DataError, TaskSpec, build_tasks, prepare, split_of, task_tag
from moe.data.sources import Example
from moe.data.tasks import Batcher

EXAMPLES = [Example(f"sentence number {i}", f"Satz Nummer {i}") for i in range(20_000)]

_CHILD = """
import json, sys
from moe.data.pipeline import split_of
from moe.data.sources import Example
print(json.dumps([split_of(Example(f"sentence number {i}", f"Satz Nummer {i}"), 0.1, 0.05)
                  for i in range(500)]))
"""


def test_split_is_the_same_in_another_process_with_another_hash_seed():
    here = [split_of(e, 0.1, 0.05) for e in EXAMPLES[:500]]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == here
    assert {"train", "valid", "test"} <= set(here)


def test_split_fractions_are_approximately_right():
    counts = Counter(split_of(e, 0.1, 0.05) for e in EXAMPLES)
    n = len(EXAMPLES)
    # binomial standard deviations are ~0.2% and ~0.15% of n; allow about 4 of them
    assert abs(counts["valid"] / n - 0.1) < 0.009
    assert abs(counts["test"] / n - 0.05) < 0.006
    assert counts["train"] + counts["valid"] + counts["test"] == n


def test_an_english_sentence_has_one_split_for_translation_and_lm():
    for e in EXAMPLES[:2000]:
        assert split_of(e, 0.1, 0.1) == split_of(Example("", e.src), 0.1, 0.1)


def test_split_rejects_fractions_that_leave_no_train():
    with pytest.raises(ValueError, match="sum below 1"):
        split_of(EXAMPLES[0], 0.6, 0.4)


def test_task_tags_come_from_target_lang_gettext_or_name():
    assert task_tag(TaskSpec("x", "lm", "text:a.txt")) == "<lm>"
    assert task_tag(TaskSpec("x", "translate", "gettext:fr")) == "<2fr>"
    assert task_tag(TaskSpec("x", "translate", "tsv:a.tsv", target_lang="es")) == "<2es>"
    assert task_tag(TaskSpec("en-it", "translate", "tsv:a.tsv")) == "<2en-it>"


def _specs(tmp_path):
    tsv = tmp_path / "extra.tsv"
    lines = [f"I have {i} apples.\tIch habe {i} Äpfel." for i in range(60)] + ["broken line"]
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [
        TaskSpec("en-de", "translate", "gettext:de"),
        TaskSpec("en-fr", "translate", "gettext:fr", weight=2.0),
        TaskSpec("en-lm", "lm", "gettext:de", max_examples=100),
        TaskSpec("apples", "translate", f"tsv:{tsv}", target_lang="de"),
    ]


def _build(tmp_path, specs):
    return build_tasks(
        specs,
        cache_dir=tmp_path / "cache",
        vocab_size=400,
        max_src_len=16,
        max_tgt_len=16,
        locale_root=tmp_path / "no-locale",
    )


def test_build_tasks_on_the_fallback_corpus_and_a_tsv(tmp_path):
    data = _build(tmp_path, _specs(tmp_path))
    assert [t.tag for t in data.tasks] == ["<2de>", "<2fr>", "<lm>", "<2de>"]
    assert [t.tag_id for t in data.tasks] == [4, 5, 6, 4]
    assert sum("built-in fallback corpus" in n for n in data.notes) == 3
    assert any("1 malformed" in n and "extra.tsv:61" in n for n in data.notes)
    assert all("\n" not in n for n in data.notes)
    de, fr, lm, apples = data.tasks
    assert de.stats.fallback_used and not apples.stats.fallback_used
    assert lm.size("train") == 100 and fr.weight == 2.0
    assert de.size("train") + de.size("valid") + de.size("test") == de.stats.examples
    src, tgt = de.splits["train"].read_rows([0])
    assert src[0, 0] == 4 and data.vocab.decode(tgt[0]) and data.vocab.decode(src[0, 1:])
    assert lm.splits["train"].widths == (1, 16)
    batch = Batcher(data.tasks, batch_size=8, max_src_len=16, max_tgt_len=16, seed=0).global_batch(
        0
    )
    assert batch["src"].shape == (8, 16)
    assert set(np.unique(batch["src"][:, 0])) <= {4, 5, 6}


def test_second_build_reuses_vocab_and_stores(tmp_path, monkeypatch):
    first = _build(tmp_path, _specs(tmp_path))

    def fail(*args, **kwargs):
        raise AssertionError("retrained the vocabulary")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", fail)
    second = _build(tmp_path, _specs(tmp_path))
    assert second.vocab.path == first.vocab.path
    assert [t.splits["train"].path for t in second.tasks] == [
        t.splits["train"].path for t in first.tasks
    ]


def test_build_tasks_rejects_duplicate_names_and_bad_sources(tmp_path):
    with pytest.raises(DataError, match="unique names"):
        _build(tmp_path, [TaskSpec("a", "lm", "gettext:de"), TaskSpec("a", "lm", "gettext:fr")])
    with pytest.raises(DataError, match=r"^tsv:.*missing.tsv: file not found"):
        _build(tmp_path, [TaskSpec("a", "translate", f"tsv:{tmp_path}/missing.tsv")])


def test_bleu_sentences_are_a_seeded_random_sample_not_the_first_ones(tmp_path):
    """The test split of a gettext task is in alphabetical order: its first n sentences are a
    biased sample. ``references(seed=...)`` draws n at random, the same for the same seed."""
    data = prepare(cfg.load(tiny_config(tmp_path)), say=lambda *a: None)
    pool = [e.src for e in data.tasks[0].examples["test"]]
    assert len(pool) > 12
    first, _, _ = data.references(0, "test", 8)
    a, refs, tokens = data.references(0, "test", 8, seed=0)
    b, _, _ = data.references(0, "test", 8, seed=0)
    c, _, _ = data.references(0, "test", 8, seed=1)
    assert first == pool[:8] and a == b and a != first and a != c
    assert len(set(a)) == 8 and set(a) <= set(pool)
    row = pool.index(a[3])  # the tokens are those of the sampled sentences
    src, _ = data.tasks[0].splits["test"].read_rows([row])
    assert (tokens[3, : src.shape[1]] == src[0]).all() and len(refs) == 8
    everything, _, _ = data.references(0, "test", 10_000, seed=0)
    assert everything == pool
