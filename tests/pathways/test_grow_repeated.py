"""Growing again and again (issue 13): a family run with three languages reserved (weight 0 by
the family's per-task weights) gets them added one after another with `moe grow`; after each
grow every earlier task -- the base tasks and the languages grown before -- evaluates
bit-identically to the run it was grown from, under many_tasks.yaml's Task-MoE routing
(``grow.json``'s ``old_tasks_check``: held-out NLL of each old task, parent vs grown model).
Each grow starts from the previous grown run's step-0
checkpoint: training a grown run never moves a frozen weight (tests/pathways/test_grow.py), so
the test skips it and stays fast."""

from __future__ import annotations

import json

import pytest
import yaml
from tinyrun import fake_locale, tiny_config, train_and_report

from moe import config as cfg
from moe.pathways import grow

pytestmark = pytest.mark.slow
RESERVED = ["en-cc", "en-dd", "en-ee"]


def test_three_languages_grown_one_after_another(tmp_path):
    root = fake_locale(tmp_path / "locale", {x: 40 for x in ("aa", "bb", "cc", "dd", "ee")})
    family = {"family": "gettext", "min_pairs": 20, "weights": {t: 0 for t in RESERVED}}
    path = tiny_config(
        tmp_path,
        tasks=[family],
        data={"locale_dir": str(root)},
        model={"encoder_layers": 1, "decoder_layers": 1},  # one MoE layer each: fast compiles
        moe={"every": 1, "routing_input": {"encoder": "token+task", "decoder": "task"}},
        train={"steps": 4},
        eval={"every": 0, "bleu_examples": 0, "max_examples": 8},
        checkpoint={"every": 0, "keep": 1},
    )
    run_dir = tmp_path / "runs" / "tiny"
    train_and_report(cfg.load(path), run_dir)
    earlier = ["en-aa", "en-bb"]
    for i, task in enumerate(RESERVED):
        gf = tmp_path / f"g{i}.yaml"
        gf.write_text(
            yaml.safe_dump(
                {
                    "name": f"grow{i}",
                    "grow": {"task": task, "add_experts": 2, "share_experts": 1},
                    "train": {"steps": 3, "warmup_steps": 1, "log_every": 1},
                    "eval": {"every": 0},
                }
            )
        )
        child_dir = grow.prepare_grown_run(run_dir, grow.load_grow_file(gf), str(gf), say=print)
        record = json.loads((child_dir / "grow.json").read_text())
        rows = record["old_tasks_check"]
        assert [n for n in earlier if rows[n]["identical"]] == earlier, (task, rows)
        assert record["params_after"] > record["params_before"]
        assert cfg.load(child_dir / "config.yaml").moe.num_experts == 4 + 2 * (i + 1)
        earlier.append(task)
        run_dir = child_dir
