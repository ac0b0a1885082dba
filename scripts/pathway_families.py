"""Do related languages share pathways more than unrelated ones? (issue 13, docs/results.md
"Many tasks"). Reads a many-task run's report.json and eval/summary.json and prints, per MoE
layer and averaged over layers, the mean pathway overlap (``moe.report.many``: the intersection
of two tasks' expert-usage distributions) of same-direction task pairs within a language family
vs across families, with a permutation test: the family labels are shuffled among the
languages (family sizes kept) and the within-minus-across difference recomputed, p = the share
of shuffles with a difference at least the observed one. Pairs of variants of one language
(pt / pt_BR, zh_CN / zh_TW, sr / sr@latin) are left out: they share their data, not only
their family.

    python scripts/pathway_families.py RUN [--permutations 2000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from moe import runfiles as rf
from moe.report import languages, many


def _pairs(rows: dict[str, dict], tasks: list[str]) -> tuple[list[tuple[int, int]], list[str]]:
    """Same-direction pairs of tasks of distinct base languages, and each task's language."""
    langs = [rows[t]["language"] if t in rows else None for t in tasks]
    pairs = []
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            b = tasks[j]
            if not langs[i] or not langs[j] or rows[a]["direction"] != rows[b]["direction"]:
                continue
            if languages.base(langs[i]) == languages.base(langs[j]):
                continue
            pairs.append((i, j))
    return pairs, [x or "" for x in langs]


def _difference(overlap, pairs, fam_of) -> tuple[float, float, int, int]:
    within = [overlap[i, j] for i, j in pairs if fam_of[i] == fam_of[j]]
    across = [overlap[i, j] for i, j in pairs if fam_of[i] != fam_of[j]]
    return float(np.mean(within)), float(np.mean(across)), len(within), len(across)


def analyse(run: Path, permutations: int, seed: int = 0) -> dict:
    report, _ = rf.read_json(run / "report.json", rf.Report)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    usage = summary.get("expert_usage") or {}
    rows = {r["task"]: r for r in many.rows(report)}
    layers = {name: {name: by_task} for name, by_task in usage.items() if by_task}
    layers["mean over layers"] = usage
    rng = np.random.default_rng(seed)
    out = {"run": str(run), "step": summary.get("step"), "layers": {}}
    for name, u in layers.items():
        tasks, overlap = many.overlap_matrix(u)
        pairs, langs = _pairs(rows, tasks)
        distinct = sorted({languages.base(x) for x in langs if x})
        fam = {lang: languages.family(lang) for lang in distinct}
        fam_of = [fam.get(languages.base(x)) for x in langs]
        within, across, n_w, n_a = _difference(overlap, pairs, fam_of)
        labels = [fam[x] for x in distinct]
        hits = 0
        for _ in range(permutations):
            shuffled = dict(zip(distinct, rng.permutation(labels)))
            perm = [shuffled.get(languages.base(x)) for x in langs]
            w, a, _, _ = _difference(overlap, pairs, perm)
            hits += (w - a) >= (within - across)
        out["layers"][name] = {
            "within": within,
            "across": across,
            "within_pairs": n_w,
            "across_pairs": n_a,
            "ratio": within / across if across else None,
            "p_value": (hits + 1) / (permutations + 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--permutations", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the record here")
    args = ap.parse_args(argv)
    for name, model in (("eval/summary.json", rf.EvalSummary), ("report.json", rf.Report)):
        _, problem = rf.read_json(args.run / name, model)
        if problem:
            print(f"pathway_families: {args.run / name} is {problem}", file=sys.stderr)
            return 2
    res = analyse(args.run, args.permutations)
    print(json.dumps(res, indent=1))
    print(f"\nstep {res['step']}, {args.permutations} permutations of the family labels\n")
    print("| layer | within family | across families | within/across | pairs (within/across) | p |")
    print("|---|---|---|---|---|---|")
    for name, r in res["layers"].items():
        print(
            f"| {name} | {r['within']:.3f} | {r['across']:.3f} | {r['ratio']:.2f} "
            f"| {r['within_pairs']}/{r['across_pairs']} | {r['p_value']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
