"""Sources: gettext catalogues (written here), text, parallel and tsv files, errors and stats."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinyrun import write_mo

from moe.data.sources import DataError, Example, load_source, normalize
from moe.errors import UserError


def _catalogues(root: Path) -> Path:
    write_mo(
        root / "de/LC_MESSAGES/app.mo",
        {
            "Open file": "Datei öffnen",
            "Save %s\nnow": "%s jetzt\tspeichern",  # whitespace collapses, placeholder kept
            "<b>Bold</b>": "<b>Fett</b>",
            "OK": "OK",  # identical: skipped
            "Untranslated": "",  # empty: skipped
            "%d file\0%d files": "%d Datei\0%d Dateien",  # plural: form 0
            "menu\x04Quit": "Beenden",  # context prefix dropped
        },
    )
    write_mo(root / "de/LC_MESSAGES/other.mo", {"Open file": "Datei öffnen", "Zoom": "Zoomen"})
    return root


def test_gettext_reads_catalogues_into_sorted_deduplicated_pairs(tmp_path):
    examples, stats = load_source("gettext:de", locale_root=_catalogues(tmp_path))
    assert examples == [
        Example("%d file", "%d Datei"),
        Example("<b>Bold</b>", "<b>Fett</b>"),
        Example("Open file", "Datei öffnen"),
        Example("Quit", "Beenden"),
        Example("Save %s now", "%s jetzt speichern"),
        Example("Zoom", "Zoomen"),
    ]
    assert (stats.examples, stats.duplicates, stats.malformed, stats.fallback_used) == (
        6,
        1,
        0,
        False,
    )


def test_gettext_lm_task_uses_the_english_side(tmp_path):
    examples, _ = load_source("gettext:de", kind="lm", locale_root=_catalogues(tmp_path))
    assert Example("", "Open file") in examples
    assert all(e.src == "" for e in examples)
    assert not any("Datei" in e.tgt for e in examples)


def test_gettext_unreadable_catalogue_is_counted_and_skipped(tmp_path):
    root = _catalogues(tmp_path)
    (root / "de/LC_MESSAGES/broken.mo").write_bytes(b"not a catalogue")
    examples, stats = load_source("gettext:de", locale_root=root)
    assert len(examples) == 6
    assert stats.malformed == 1 and stats.malformed_at[0].startswith("broken.mo")


def test_gettext_without_catalogues_uses_the_fallback_corpus(tmp_path):
    examples, stats = load_source("gettext:fr", locale_root=tmp_path)
    assert stats.fallback_used and len(examples) >= 300
    assert Example("Thank you.", "Merci.") in examples
    assert Example("I like the dog.", "J'aime le chien.") in examples


def test_gettext_without_catalogues_or_fallback_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"^gettext:xx: no catalogues under .*xx") as err:
        load_source("gettext:xx", locale_root=tmp_path)
    assert "\n" not in str(err.value)


def test_text_source_gives_lm_examples_one_per_nonblank_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n  second\tline \nfirst line\n", encoding="utf-8")
    examples, stats = load_source(f"text:{path}", kind="lm")
    assert examples == [Example("", "first line"), Example("", "second line")]
    assert stats.duplicates == 1


def test_text_source_cannot_serve_translation(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a line\n", encoding="utf-8")
    with pytest.raises(DataError, match="no translations"):
        load_source(f"text:{path}", kind="translate")


def test_parallel_source_pairs_lines_and_counts_one_sided_lines(tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text("hello\nworld\nalone\n", encoding="utf-8")
    tgt.write_text("hallo\nWelt\n\n", encoding="utf-8")
    examples, stats = load_source(f"parallel:{src},{tgt}")
    assert examples == [Example("hello", "hallo"), Example("world", "Welt")]
    assert stats.malformed == 1 and stats.malformed_at == ("a.en:3",)


def test_parallel_source_with_different_line_counts_is_an_error(tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text("hello\nworld\n", encoding="utf-8")
    tgt.write_text("hallo\n", encoding="utf-8")
    with pytest.raises(DataError, match="2 source lines but 1 target lines") as err:
        load_source(f"parallel:{src},{tgt}")
    assert str(err.value).startswith(f"parallel:{src},{tgt}:") and "\n" not in str(err.value)


def test_tsv_source_counts_skips_and_reports_malformed_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("hello\thallo\nno tab here\n\na\tb\tc\nempty\t\nyes\tja\n", encoding="utf-8")
    examples, stats = load_source(f"tsv:{path}")
    assert examples == [Example("hello", "hallo"), Example("yes", "ja")]
    assert stats.malformed == 3
    assert stats.malformed_at == ("pairs.tsv:2", "pairs.tsv:4", "pairs.tsv:5")
    assert "3 malformed (pairs.tsv:2" in stats.summary(f"tsv:{path}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tsv:{d}/missing.tsv", "file not found"),
        ("text:{d}/missing.txt", "file not found"),
        ("parallel:{d}/x.en,{d}/x.de", "file not found"),
        ("parallel:{d}/x.en", "expected parallel:<src_path>,<tgt_path>"),
        ("csv:{d}/x.csv", "unknown source scheme 'csv'"),
        ("nothing", "expected '<scheme>:<argument>'"),
        ("tsv:{d}/empty.tsv", "no usable examples"),
    ],
)
def test_bad_sources_raise_a_one_line_data_error_naming_the_source(tmp_path, spec, message):
    (tmp_path / "empty.tsv").write_text("only malformed\n", encoding="utf-8")
    spec = spec.format(d=tmp_path)
    with pytest.raises(DataError, match=message) as err:
        load_source(spec, kind="lm" if spec.startswith("text") else "translate")
    assert str(err.value).startswith(spec) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_length_filter_drops_and_counts_long_examples(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("short\tkurz\nthis is long\tdas ist lang\nok\tgut\n", encoding="utf-8")
    examples, stats = load_source(f"tsv:{path}", max_chars=6)
    assert examples == [Example("short", "kurz"), Example("ok", "gut")]
    assert stats.too_long == 1
    with pytest.raises(DataError, match="all 3 examples are longer than max_chars=1"):
        load_source(f"tsv:{path}", max_chars=1)


def test_normalize_collapses_whitespace_and_keeps_markup():
    assert normalize(" a\tb\n\nc  <i>%s</i> ") == "a b c <i>%s</i>"
