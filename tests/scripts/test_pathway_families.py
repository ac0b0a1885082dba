"""scripts/pathway_families.py: within-vs-across-family pathway overlap and its permutation test,
on a run directory written here (report.json, eval/summary.json) with known usage."""

import json
import runpy
from pathlib import Path

import numpy as np

from moe import runfiles as rf

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pathway_families.py"
LANGS = {"Romance": ["fr", "es", "it", "pt"], "Slavic": ["ru", "pl", "cs", "uk"]}


def _run(tmp_path: Path, usage_of) -> Path:
    """A run of en-x tasks (plus pt_BR, a variant of pt) whose expert usage is usage_of(lang)."""
    langs = [x for group in LANGS.values() for x in group] + ["pt_BR"]
    names = [f"en-{x}" for x in langs]
    report = rf.Report(
        tasks={n: rf.ReportTask(kind="translate") for n in names},
        data={n: rf.TaskData(language=x) for n, x in zip(names, langs)},
    )
    rf.write_json(tmp_path / "report.json", report)
    usage = {"encoder/1": {n: usage_of(x) for n, x in zip(names, langs)}}
    usage["decoder/1"] = {n: [1.0, 1.0, 1.0, 1.0] for n in names}  # every task the same
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"step": 7, "expert_usage": usage}))
    return tmp_path


def test_families_that_share_experts_are_found_and_variants_left_out(tmp_path):
    script = runpy.run_path(str(SCRIPT))

    def by_family(lang):  # Romance on experts 0-1, Slavic on 2-3
        return [1.0, 1.0, 0.0, 0.0] if lang in LANGS["Romance"] + ["pt_BR"] else [0, 0, 1.0, 1.0]

    res = script["analyse"](_run(tmp_path, by_family), permutations=300)
    enc = res["layers"]["encoder/1"]
    # 4 + 4 languages: 6 + 6 within pairs (+ pt_BR with fr/es/it; pt/pt_BR left out), 4*5 across
    assert (enc["within_pairs"], enc["across_pairs"]) == (15, 20)
    assert enc["within"] == 1.0 and enc["across"] == 0.0
    assert enc["p_value"] < 0.05
    dec = res["layers"]["decoder/1"]
    assert dec["within"] == dec["across"] == 1.0 and dec["p_value"] > 0.5
    mean = res["layers"]["mean over layers"]
    assert np.isclose(mean["within"], 1.0) and np.isclose(mean["across"], 0.5)


def test_usage_unrelated_to_family_is_not_significant(tmp_path):
    script = runpy.run_path(str(SCRIPT))
    rng = np.random.default_rng(3)
    table = {x: rng.dirichlet(np.ones(6)).tolist() for g in LANGS.values() for x in g}
    table["pt_BR"] = table["pt"]

    res = script["analyse"](_run(tmp_path, table.__getitem__), permutations=300)
    assert res["layers"]["encoder/1"]["p_value"] > 0.05


def test_a_run_without_evaluation_is_one_line_and_exit_2(tmp_path, capsys):
    script = runpy.run_path(str(SCRIPT))
    assert script["main"]([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval/summary.json" in err
