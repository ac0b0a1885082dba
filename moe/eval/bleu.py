"""Corpus BLEU through sacrebleu (with its signature), degenerate outputs (empty, looping), and
the decoded outputs written to files so anyone can recompute the score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sacrebleu


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU of detokenised strings with sacrebleu's defaults (13a tokenisation, one
    reference per sentence), and sacrebleu's signature string so the number is reproducible."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references"
        )
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


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
