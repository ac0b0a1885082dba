"""Task families: ``tasks: [{family: gettext, ...}]`` expands over a locale tree of the test's
own into named tasks, validated with one-line errors, with per-task weights."""

from __future__ import annotations

import pytest
import yaml
from tinyrun import fake_locale

from moe import catalogues
from moe import config as cfg


def _write(tmp_path, family, extra_tasks=()):
    root = fake_locale(tmp_path / "locale", {"aa": 40, "bb": 30, "cc": 20, "dd": 5, "en_GB": 30})
    raw = {
        "tasks": [*extra_tasks, {"family": "gettext", **family}],
        "data": {"locale_dir": str(root), "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_family_expands_to_named_tasks_in_both_directions(tmp_path):
    lm = {"name": "en-lm", "kind": "lm", "source": "gettext:aa"}
    path = _write(
        tmp_path,
        {"directions": ["en-x", "x-en"], "min_pairs": 10, "weights": {"cc-en": 0}},
        [lm],
    )
    exp = cfg.load(path)
    names = [t.name for t in exp.tasks]
    assert names == ["en-lm", "en-aa", "en-bb", "en-cc", "aa-en", "bb-en", "cc-en"]
    by = {t.name: t for t in exp.tasks}
    assert by["aa-en"].reverse and not by["en-aa"].reverse
    assert by["cc-en"].weight == 0 and by["en-cc"].weight == 1
    assert by["bb-en"].source == "gettext:bb" and by["bb-en"].group == "gettext/x-en"
    shown = cfg.dump(exp)  # `moe config show`: the expanded tasks, and it loads back as is
    assert "name: cc-en" in shown and "family:" not in shown
    assert cfg.from_dict(yaml.safe_load(shown)) == exp
    assert list((tmp_path / "cache" / "catalogues").glob("pairs-*.json"))  # counted once, cached


def test_family_selection_options(tmp_path):
    exp = cfg.load(_write(tmp_path, {"min_pairs": 1, "exclude": ["bb"], "max_languages": 2}))
    assert [t.name for t in exp.tasks] == ["en-aa", "en-cc"]  # en_GB is English: never a task


@pytest.mark.parametrize(
    "family, expected",
    [
        ({"min_pairs": 100}, "tasks.0.min_pairs=100: no language qualifies (the most pairs: 40)"),
        (
            {"min_pairs": 9, "weights": {"en-ab": 2}},
            "tasks.0.weights: 'en-ab' is not a task of this family",
        ),
        ({"min_pairs": 9, "languages": ["zz"]}, "tasks.0: no gettext catalogues for language 'zz'"),
        ({"languages": ["dd"], "min_pairs": 10}, "'dd' has 5 usable pairs, fewer than"),
        (
            {"min_pairs": 9, "directions": ["x-y"]},
            "tasks.0.directions.0: Input should be 'en-x' or 'x-en'",
        ),
        ({"min_pairs": 1, "colour": 1}, "tasks.0.colour: Extra inputs are not permitted"),
    ],
)
def test_family_errors_are_one_line(tmp_path, family, expected):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(_write(tmp_path, family))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_counts_follow_the_tree(tmp_path):
    root = fake_locale(tmp_path / "locale", {"aa": 12, "bb": 8})
    assert catalogues.count_pairs(root, None, tmp_path / "c", workers=1) == {"aa": 12, "bb": 8}
    fake_locale(tmp_path / "locale", {"aa": 20})  # a changed catalogue: a new cache key
    assert catalogues.count_pairs(root, None, tmp_path / "c", workers=1)["aa"] == 20
    assert catalogues.count_pairs(root, 5, tmp_path / "c", workers=1)["aa"] < 20  # max_chars


def test_overrides_reach_a_family(tmp_path):
    path = _write(tmp_path, {"min_pairs": 1})
    exp = cfg.load(path, ["tasks.0.max_languages=1", "tasks.0.weights={en-aa: 3}"])
    assert [(t.name, t.weight) for t in exp.tasks] == [("en-aa", 3.0)]
    with pytest.raises(cfg.ConfigError, match="tasks.0.max_langs: Extra inputs"):
        cfg.load(path, ["tasks.0.max_langs=1"])
