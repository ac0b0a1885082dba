"""Corpus BLEU (tokenizer by target language) and chrF through sacrebleu, with their
signatures; degenerate outputs (empty, looping); the decoded outputs written to files so anyone
can recompute the scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sacrebleu

# sacrebleu's tokenizer for a target language (its docs: 13a is for space-separated scripts;
# Japanese and Chinese need a word segmenter, else a "word" is a whole clause).
TOKENIZE_BY_LANGUAGE = {"ja": "ja-mecab", "zh": "zh"}
DEFAULT_TOKENIZE = "13a"


def target_language(source: str) -> str | None:
    """The target language of a task source, where the source names it (``gettext:ja_JP`` ->
    ``ja``); None for text, tsv and parallel files."""
    scheme, _, arg = source.partition(":")
    if scheme != "gettext" or not arg:
        return None
    return arg.replace("-", "_").split("_")[0].split("@")[0].lower() or None


def tokenizer_for(language: str | None, override: str | None = None) -> str:
    """sacrebleu's tokenizer for BLEU: ``override`` (a task's ``bleu_tokenize``) if given, else
    ``ja-mecab`` for Japanese, ``zh`` for Chinese, ``13a`` otherwise."""
    return override or TOKENIZE_BY_LANGUAGE.get(language or "", DEFAULT_TOKENIZE)


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str], tokenize: str = DEFAULT_TOKENIZE
) -> tuple[float, str]:
    """Corpus BLEU of detokenised strings with sacrebleu (tokenizer ``tokenize``, one
    reference per sentence), and sacrebleu's signature string so the number is reproducible
    (it names the tokenizer: ``tok:ja-mecab-0.996-IPA``)."""
    _check(hypotheses, references)
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2) and its signature; it
    needs no tokenizer, so it reads the same for every language."""
    _check(hypotheses, references)
    metric = sacrebleu.metrics.CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def write_decodes(
    run_dir: str | Path, task: str, hyps: Sequence[str], refs: Sequence[str]
) -> tuple[Path, Path]:
    """Write ``eval/<task>.hyp.txt`` and ``eval/<task>.ref.txt`` under ``run_dir``, one sentence
    per line (line breaks inside a sentence become spaces, so line i of both files pair up).
    Returns the two paths."""
    if len(hyps) != len(refs):
        raise ValueError(f"write_decodes({task!r}): {len(hyps)} hypotheses but {len(refs)} refs")
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{task}.hyp.txt", out / f"{task}.ref.txt")
    for path, lines in zip(paths, (hyps, refs)):
        path.write_text("".join(_one_line(s) + "\n" for s in lines), encoding="utf-8")
    return paths


def loops(text: str, times: int = 3) -> bool:
    """Whether a line repeats one word ``times`` times in a row ("ist ist ist")."""
    words = text.split()
    return any(len(set(words[i : i + times])) == 1 for i in range(len(words) - times + 1))


def degenerate_fractions(hypotheses: Sequence[str]) -> tuple[float, float]:
    """(empty, looping) shares of the decoded lines."""
    n = max(len(hypotheses), 1)
    empty = sum(not h.strip() for h in hypotheses) / n
    return empty, sum(loops(h) for h in hypotheses) / n


# Above these shares of the decoded lines, the run's outputs are called degenerate.
EMPTY_WARN, LOOPING_WARN = 0.1, 0.2


def degenerate_warning(task: str, empty: float | None, looping: float | None) -> str | None:
    """One line saying a task's decodes are degenerate (too many empty or looping lines), or
    None when they are not (or were not measured)."""
    parts = []
    if empty is not None and empty > EMPTY_WARN:
        parts.append(f"{empty:.0%} of the decoded lines are empty")
    if looping is not None and looping > LOOPING_WARN:
        parts.append(f"{looping:.0%} loop (a word three times in a row)")
    if not parts:
        return None
    return f"{task}: {' and '.join(parts)}; its BLEU means little (train longer?)"
