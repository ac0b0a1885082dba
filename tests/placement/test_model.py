"""The placement cost model on small hand-worked cases, and the placers' guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from moe.placement import search
from moe.placement.model import CostModel, LayerStats, Layout
from moe.pod.topology import parse_slice

# k = 2, E = 4: experts 0 and 2 are often chosen together (6 tokens), 1 and 3 sometimes (2).
CO = np.array([[10, 0, 6, 0], [0, 4, 0, 2], [6, 0, 8, 0], [0, 2, 0, 6]], float)
FIRST = np.diag(np.diag(CO))  # first-choice counts only (no partials needed here)


def model(layers, *, ep=2, slice_="cpu:2", schedule="home", **kw):
    layout = Layout.for_mesh({"data": 1, "expert": ep}, hosts=1)
    return CostModel(layers, layout, parse_slice(slice_), bytes_per_token=1.0,
                     flops_per_choice=1.0, schedule=schedule, **kw)  # fmt: skip


def test_home_traffic_and_loads_by_hand():
    m = model([LayerStats("encoder/1", CO, FIRST)])
    ident = m.identity()
    np.testing.assert_array_equal(ident["encoder/1"], [0, 0, 1, 1])
    # identity: columns hold {0, 1} and {2, 3}: loads 14 and 14, no co-located pair, so each
    # group sends N = [14, 14] tokens to the other column.
    send, back = m.traffic("encoder/1", ident)
    np.testing.assert_array_equal(send, [[0, 14], [14, 0]])
    np.testing.assert_array_equal(back, send.T)
    assert m.layer_figures("encoder/1", ident)["max_device_load"] == 1.0
    # {0, 2} and {1, 3}: loads 18 and 10 (max/mean 18/14), but a token using both 0 and 2
    # travels once: N = [18 - 6, 10 - 2] = [12, 8].
    paired = {"encoder/1": np.array([0, 1, 0, 1])}
    send, _ = m.traffic("encoder/1", paired)
    np.testing.assert_array_equal(send, [[0, 8], [12, 0]])
    f = m.layer_figures("encoder/1", paired)
    assert f["max_device_load"] == pytest.approx(18 / 14)
    # forward + backward: the two messages each way, 4 x 20 tokens of 1 byte
    assert f["cross_device_bytes"] == 4 * 20
    host = m.pod.chip.for_devices(2)
    one_way = 20 / host.link_bandwidth + host.link_latency
    assert f["projected_exchange_ms"] == pytest.approx(1e3 * 4 * one_way)
    # the busiest column's 18 choices from each of the 2 groups, at half the host's rate
    assert f["projected_expert_ms"] == pytest.approx(1e3 * 36 / (host.peak_flops / 2))


def test_affinity_dispatches_from_the_previous_layers_first_expert():
    # E = 2 on 2 columns. Tokens first at expert 0 in layer A mostly use expert 0 in layer B.
    x = np.array([[5.0, 1.0], [2.0, 7.0]])
    a = LayerStats("encoder/1", np.eye(2) * 7, np.eye(2) * 7)
    b = LayerStats("encoder/3", np.eye(2) * 8, np.eye(2) * 8, "encoder/1", x)
    m = model([a, b], schedule="affinity")
    aligned = {"encoder/1": np.array([0, 1]), "encoder/3": np.array([0, 1])}
    crossed = {"encoder/1": np.array([0, 1]), "encoder/3": np.array([1, 0])}
    # row total over the 2 groups: 2 x the per-group counts
    np.testing.assert_array_equal(m.traffic("encoder/3", aligned)[0], [[0, 2], [4, 0]])
    np.testing.assert_array_equal(m.traffic("encoder/3", crossed)[0], [[0, 10], [14, 0]])
    # the stack's last layer also sends tokens home: 8 tokens first at each expert, split
    assert len(m.traffic("encoder/3", aligned)) == 3 and len(m.traffic("encoder/1", aligned)) == 2
    assert m.affected("encoder/1") == ["encoder/1", "encoder/3"]
    cost = lambda d: m.figures(d)["projected_exchange_ms"]
    assert cost(aligned) < cost(crossed)
    assert model([a, b]).affected("encoder/1") == ["encoder/1"]  # home: layers independent


def random_layer(name, e, seed, previous=None, e_prev=None):
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.full(e, 0.3), size=200)  # skewed choices of 200 tokens
    picks = np.argsort(-t, axis=1)[:, :2]
    kept = np.zeros((200, e))
    kept[np.arange(200)[:, None], picks] = 1
    first = np.eye(e)[picks[:, 0]]
    trans = None
    if previous is not None:
        trans = np.eye(e_prev)[rng.integers(0, e_prev, 200)].T @ kept
    return LayerStats(name, kept.T @ kept, first.T @ kept, previous, trans)


@pytest.mark.parametrize("schedule,slice_", [("home", "tpu-v4:2x2x1"), ("affinity", "cpu:4")])
def test_placers_beat_or_keep_identity(schedule, slice_):
    layers = [random_layer("encoder/1", 8, 1), random_layer("encoder/3", 8, 2, "encoder/1", 8)]
    m = model(layers, ep=4, slice_=slice_, schedule=schedule)
    found = search.run_all(m, seed=0, iterations=600)
    for r in found.values():  # balanced: 2 experts on each of the 4 columns
        for dev in r["dev"].values():
            assert sorted(np.bincount(dev, minlength=4)) == [2, 2, 2, 2]
    obj = {k: r["figures"]["objective_ms"] for k, r in found.items()}
    assert obj["annealing"] <= min(obj["identity"], obj["greedy"]) + 1e-12
    chosen = found[search.choose(found)]["figures"]
    base = found["identity"]["figures"]
    keys = ("max_device_load", "projected_exchange_ms")
    assert not all(chosen[k] > base[k] for k in keys)
    assert search.choose(found) == "identity" or any(chosen[k] < base[k] for k in keys)


def test_one_expert_column_keeps_identity():
    m = model([random_layer("decoder/1", 4, 3)], ep=1, slice_="cpu:1")
    found = search.run_all(m, seed=0, iterations=50)
    assert search.choose(found) == "identity"


def test_choose_refuses_a_placement_worse_on_both():
    def fig(load, exchange, objective):
        keys = ("max_device_load", "projected_exchange_ms", "objective_ms")
        return {"figures": dict(zip(keys, (load, exchange, objective)))}

    found = {"identity": fig(1.2, 1.0, 2.0), "greedy": fig(1.3, 1.1, 1.9)}
    assert search.choose(found) == "identity"
    found["annealing"] = fig(1.1, 1.05, 1.95)  # better load, worse exchange, lower objective
    assert search.choose(found) == "annealing"


def test_permutation_lists_each_columns_experts_in_order():
    assert search.permutation(np.array([1, 0, 1, 0])) == [1, 3, 0, 2]
