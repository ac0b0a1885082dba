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


@pytest.mark.parametrize(
    "source, override, expected",
    [
        ("gettext:ja", None, "ja-mecab"),
        ("gettext:zh_CN", None, "zh"),
        ("gettext:de", None, "13a"),
        ("tsv:ja.tsv", None, "13a"),  # a file names no language: the task says it
        ("tsv:ja.tsv", "ja-mecab", "ja-mecab"),
        ("gettext:ja", "char", "char"),
    ],
)
def test_tokenizer_by_target_language_or_the_tasks_override(source, override, expected):
    assert bleu.tokenizer_for(bleu.target_language(source), override) == expected


def test_japanese_bleu_segments_words_and_says_so_in_the_signature():
    """13a sees a Japanese sentence without spaces as one or two 'words'; MeCab segments it."""
    hyps = ["今日は良い天気ですね。", "私は学生です。"]
    refs = ["今日はいい天気ですね。", "私は先生です。"]
    mecab, signature = bleu.corpus_bleu(hyps, refs, "ja-mecab")
    plain, _ = bleu.corpus_bleu(hyps, refs)
    assert "tok:ja-mecab" in signature
    assert plain == pytest.approx(0.0) and mecab > 20
    assert mecab == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="ja-mecab").score)


def test_chrf_equals_sacrebleu():
    score, signature = bleu.corpus_chrf(HYPS, REFS)
    assert score == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < score < 100 and signature.startswith("nrefs:1") and "nc:6" in signature


def test_degenerate_warning_only_above_the_thresholds():
    assert bleu.degenerate_warning("t", 0.05, 0.1) is None
    assert bleu.degenerate_warning("t", None, None) is None
    assert "50% of the decoded lines are empty" in bleu.degenerate_warning("t", 0.5, 0.0)
    assert "30% loop" in bleu.degenerate_warning("t", 0.0, 0.3)
