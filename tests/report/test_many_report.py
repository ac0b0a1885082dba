"""The many-task report (more than 12 tasks): tasks.csv, best/median/worst and family means,
pathway overlap within vs across families, the clustered heatmap and BLEU vs size."""

from __future__ import annotations

import csv
import json

import numpy as np

from moe.report import build as report
from moe.report import many

from .test_report import LAYERS, PNG_MAGIC, _write_run

LANGS = ["fr", "es", "it", "pt", "de", "nl", "sv", "ru", "uk", "pl"]


def _usage(lang):
    """Romance languages use experts 0-1, Germanic 2-3, Slavic 4-5 (of 6)."""
    fam = {"fr": 0, "es": 0, "it": 0, "pt": 0, "de": 1, "nl": 1, "sv": 1}.get(lang, 2)
    load = np.full(6, 0.02)
    load[2 * fam : 2 * fam + 2] = 0.46
    return load.tolist()


def test_many_task_report(tmp_path):
    tasks = [f"en-{x}" for x in LANGS] + [f"{x}-en" for x in LANGS] + ["en-lm"]
    kinds = ["translate"] * 20 + ["lm"]
    run = _write_run(tmp_path / "run", tasks=tasks, kinds=kinds)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    for i, name in enumerate(tasks):
        summary["tasks"][name]["perplexity"] = 10.0 + i
        if name != "en-lm":
            summary["tasks"][name]["bleu"] = float(i)
    summary["expert_usage"] = {
        layer: {t: _usage(t.replace("en-", "").replace("-en", "")) for t in tasks}
        for layer in LAYERS
    }
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    built = report.build(run)
    m = built.many
    assert m.by_bleu[0] == "pl-en" and m.by_bleu[-1] == "en-fr"
    assert m.by_perplexity[0] == "en-fr" and "en-lm" in m.by_perplexity
    assert m.groups["family: Romance"].tasks == 8 and m.groups["direction: lm"].tasks == 1
    assert m.overlap.within > 0.9 > 0.2 > m.overlap.across  # by construction of the usage
    assert set(m.overlap.by_family) == {"Romance", "Germanic", "Slavic"}
    rows = list(csv.DictReader((run / many.CSV).open()))
    assert len(rows) == 21 and rows[0]["family"] == "Romance" and rows[0]["train_examples"] == "90"
    for plot in (many.HEATMAP, many.BLEU_PLOT):
        assert (run / plot).read_bytes().startswith(PNG_MAGIC)
    md = (run / "report.md").read_text()
    assert "## 21 tasks at a glance" in md and "| worst | `en-fr` |" in md
    assert "within a language family" in md and "`en-es`: perplexity" not in md
    assert not (run / "expert_usage.png").exists()  # one row per task would not be readable
