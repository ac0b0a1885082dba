"""scripts/bench_serving.py --quick builds its four tiny runs and writes one row per model."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


@pytest.mark.slow
def test_bench_serving_quick_writes_a_row_per_model(tmp_path, capsys):
    bench = runpy.run_path(str(SCRIPT))
    out = tmp_path / "bench.json"
    assert bench["main"](["--quick", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    models = result["models"]
    assert list(models) == ["float", "int8", "student", "dense"]
    for row in models.values():
        assert row["decode_tokens_per_second"] > 0 and row["param_bytes"] > 0
        assert row["decode_ms_per_step"] > 0 and 0 < row["decode_steps"] <= 12
    assert models["int8"]["expert_bytes"] < 0.3 * models["float"]["expert_bytes"]
    assert models["student"]["expert_bytes"] == 0
    assert models["student"]["param_bytes"] == models["dense"]["param_bytes"]
    assert set(result["matmul"]) == {"float32", "int8_dequantised", "int8_x_int8"}
    assert "tokens/s" in capsys.readouterr().out
