"""Rewrite tests/training/golden/<config>.json: the partition specs of every experiment config.

Run after an intended change of shardings, review the diff, commit it:
    .venv/bin/python scripts/update_golden_shardings.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe import config as cfg  # noqa: E402
from moe.training.sharding import state_specs  # noqa: E402

GOLDEN = ROOT / "tests" / "training" / "golden"


def experiment_configs() -> list[Path]:
    """configs/*.yaml that are experiments (grow files, with a `grow:` section, are not)."""
    import yaml

    return [
        p
        for p in sorted((ROOT / "configs").glob("*.yaml"))
        if "grow" not in (yaml.safe_load(p.read_text()) or {})
    ]


def main() -> int:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for path in experiment_configs():
        specs = state_specs(cfg.load(path))
        out = GOLDEN / f"{path.stem}.json"
        out.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
        print(f"{out.relative_to(ROOT)}: {len(specs)} arrays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
