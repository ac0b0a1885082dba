"""Corpus BLEU against sacrebleu itself, and the decoded-output files it is recomputed from."""

import pytest
import sacrebleu

from moe.eval import bleu

HYPS = ["the cat sat on the mat", "a quick brown fox", "hello there , world !"]
REFS = ["the cat sat on a mat", "the quick brown fox", "hello , world !"]


def test_bleu_equals_sacrebleu_on_the_written_files(tmp_path):
    hyp_path, ref_path = bleu.write_decodes(tmp_path, "en-de", HYPS, REFS)
    assert hyp_path == tmp_path / "eval" / "en-de.hyp.txt"
    assert ref_path == tmp_path / "eval" / "en-de.ref.txt"
    hyps = hyp_path.read_text(encoding="utf-8").splitlines()
    refs = ref_path.read_text(encoding="utf-8").splitlines()
    score, signature = bleu.corpus_bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert 0 < score < 100
    assert "tok:13a" in signature and "nrefs:1" in signature


def test_write_decodes_keeps_one_line_per_sentence(tmp_path):
    hyp_path, _ = bleu.write_decodes(tmp_path, "t", ["two\nlines", "ok"], ["r1", "r2"])
    assert hyp_path.read_text(encoding="utf-8").splitlines() == ["two lines", "ok"]


def test_bleu_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu.corpus_bleu(["a", "b"], ["a"])


def test_degenerate_lines_are_counted():
    hyps = ["Die Die Die Katze", "", "ein Hund", "pas pas", "x y x y x y"]
    assert bleu.loops("ist ist ist nicht") and not bleu.loops("ist ist nicht ist")
    assert bleu.degenerate_fractions(hyps) == (0.2, 0.2)
