"""Many languages: reversed (xx -> en) tasks split by their English side, sources read once
(in parallel when many), a vocabulary sample fair to every language, <unk> rates per language."""

from __future__ import annotations

from tinyrun import fake_locale

from moe.data import multilingual
from moe.data.pipeline import TaskSpec, build_tasks, task_tag
from moe.data.sources import Example


def _build(tmp_path, specs, **kw):
    root = fake_locale(tmp_path / "locale", {"aa": 60, "bb": 40, "cc": 30})
    return build_tasks(
        specs,
        cache_dir=tmp_path / "cache",
        vocab_size=120,
        max_src_len=12,
        max_tgt_len=12,
        valid_fraction=0.1,
        test_fraction=0.2,
        locale_root=root,
        **kw,
    )


def test_reverse_tasks_swap_sides_keep_splits_and_are_tagged_english(tmp_path):
    specs = [
        TaskSpec("en-aa", "translate", "gettext:aa"),
        TaskSpec("aa-en", "translate", "gettext:aa", reverse=True),
        TaskSpec("bb-en", "translate", "gettext:bb", reverse=True),
    ]
    assert [task_tag(s) for s in specs] == ["<2aa>", "<2en>", "<2en>"]
    assert specs[1].languages == ("aa", "en")
    lines = []
    data = _build(tmp_path, specs, max_heldout=3, say=lines.append)
    fwd, rev = data.tasks[0], data.tasks[1]
    for split in ("valid", "test"):
        assert [Example(e.tgt, e.src) for e in rev.examples[split]] == list(fwd.examples[split])
        assert len(fwd.examples[split]) <= 3  # a fixed subset of each held-out split
    assert fwd.size("train") == rev.size("train")
    assert set(data.unk_rates) == {"en", "aa", "bb"}


def test_vocab_sample_caps_each_language_and_is_fixed():
    by_lang = {"big": [f"b{i}" for i in range(100)], "small": ["s1", "s2", "s1"]}
    texts = multilingual.vocab_sample(by_lang, 10)
    assert sum(t.startswith("b") for t in texts) == 10 and {"s1", "s2"} <= set(texts)
    assert multilingual.vocab_sample(by_lang, 10) == texts
    assert len(multilingual.vocab_sample(by_lang, None)) == 102


def test_sources_are_read_once_in_parallel_with_progress(tmp_path):
    root = fake_locale(tmp_path / "locale", {x: 12 for x in ("aa", "bb", "cc", "dd", "ee", "ff")})
    keys = [(f"gettext:{x}", "translate") for x in ("aa", "bb", "cc", "dd", "ee", "ff", "aa")]
    lines = []
    out = multilingual.load_sources(
        keys, locale_root=root, max_chars=None, workers=2, say=lines.append
    )
    serial = multilingual.load_sources(keys, locale_root=root, max_chars=None, workers=1)
    assert len(out) == 6 and out == serial
    assert lines[-1] == "data: read 6/6 sources (2 processes)"


def test_gettext_sources_are_cached_until_a_catalogue_changes(tmp_path):
    root = fake_locale(tmp_path / "locale", {"aa": 12, "bb": 8})
    keys = [("gettext:aa", "translate"), ("gettext:bb", "lm")]
    first = multilingual.load_sources(keys, locale_root=root, max_chars=None, cache_dir=tmp_path)
    entries = sorted((tmp_path / "sources").glob("*.json"))  # JSON: a cache never runs code
    assert len(entries) == 2 and not list((tmp_path / "sources").glob("*.pkl"))
    again = multilingual.load_sources(keys, locale_root=root, max_chars=None, cache_dir=tmp_path)
    assert again == first
    entries[0].write_text('{"examples": [["a"]]')  # a damaged entry is read again, not fatal
    assert (
        multilingual.load_sources(keys, locale_root=root, max_chars=None, cache_dir=tmp_path)
        == first
    )
    fake_locale(tmp_path / "locale", {"aa": 20})
    changed = multilingual.load_sources(keys, locale_root=root, max_chars=None, cache_dir=tmp_path)
    assert changed[keys[0]][1].examples == 20 and changed[keys[1]] == first[keys[1]]
