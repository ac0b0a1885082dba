"""Learned pathways: the fewest experts that carry a task's tokens."""

from moe.pathways import usage


def test_suggested_pathways_are_the_fewest_experts_covering_the_load():
    load = {"decoder/1": {"a": [0.5, 0.05, 0.3, 0.15], "b": [0.25, 0.25, 0.25, 0.25]}}
    got = usage.suggest(load, coverage=0.9, min_experts=2)
    assert got == {"a": {"decoder/1": [0, 2, 3]}, "b": {"decoder/1": [0, 1, 2, 3]}}
    assert usage.suggest(load, coverage=0.5, min_experts=2)["a"] == {"decoder/1": [0, 2]}
    assert usage.ranked([0.1, 0.4, 0.4, 0.1]) == [1, 2, 0, 3]
