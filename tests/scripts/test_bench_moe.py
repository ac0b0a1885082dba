"""scripts/bench_moe.py --quick runs end to end and writes the JSON the issue asks for."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe.py"


@pytest.mark.slow
def test_bench_moe_quick_writes_a_row_per_expert_count(tmp_path, capsys):
    bench = runpy.run_path(str(SCRIPT))
    out = tmp_path / "bench.json"
    assert bench["main"](["--quick", "--json", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["experts"] for c in cases] == [4, 8]
    for case in cases:
        assert {"experts", "tokens", "moe_ms", "dense_ms", "einsum_ms"} <= set(case)
        assert all(case[k] > 0 for k in ("moe_ms", "dense_ms", "einsum_ms"))
    assert "moe/dense" in capsys.readouterr().out
