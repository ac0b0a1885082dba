import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_parallel.py"


@pytest.mark.slow
def test_quick_bench_writes_cases_with_projections(tmp_path):
    out = tmp_path / "bench.json"
    calibration = tmp_path / "cpu.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--runs", "2", "--json", str(out),
         "--calibration", str(calibration)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["case"]: r for r in result["cases"]}
    sharded = rows["d32-E8-T256-2x4"]
    assert sharded["all_to_all_bytes"] > 0 and rows["d32-E8-T256-1x1"]["all_to_all_bytes"] == 0
    assert all(r["measured_ms"] > 0 and r["projected_ms"] > 0 for r in rows.values())
    assert sharded["tpu_v4_ms"] > 0 and sharded["h100_ms"] > 0
    assert [o["case"] for o in result["overhead"]] == ["d32-E8-T256-2x4"]
    assert "cost model:" in run.stdout and calibration.is_file()
