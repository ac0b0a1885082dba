"""Progress lines where there is no bar (under mpirun, into a file): when, and what they say."""

from __future__ import annotations

from moe.training import metrics_log
from moe.training.metrics_log import Ticker


def test_a_line_at_each_tenth_and_at_least_every_30_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: now[0])
    ticker = Ticker(total=1000, every=100, enabled=True)
    assert [s for s in range(10, 310, 10) if ticker.due(s)] == [100, 200, 300]
    now[0] = 31.0  # a slow run: a line every 30 s even between tenths
    assert ticker.due(310) and not ticker.due(320)
    assert not Ticker(total=1000, every=100, enabled=False).due(100)  # a bar shows it instead


def test_the_line_has_percent_steady_speed_and_eta():
    line = Ticker(total=450, every=40, enabled=True).line(200, 3.4567, 12345.6, 80.0)
    assert line == (
        "moe: step 200/450 (44%) loss 3.457, 12,346 tok/s (steady), 80 ms/step, ETA 0:20"
    )
    slow = Ticker(total=100_000, every=10_000, enabled=True).line(10, 5.0, 10.0, 100.0)
    assert slow.endswith("ETA 2:46:39")
    assert Ticker(total=10, every=1, enabled=True).line(1, 5.0, None, None).endswith("loss 5.000")
