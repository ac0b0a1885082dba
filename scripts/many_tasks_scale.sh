#!/usr/bin/env bash
# What adding tasks costs (issue 13, docs/results.md "Many tasks"): configs/many_tasks.yaml at
# 5, 25 and 109 tasks (the family's max_languages: 2, 12, all; plus English LM), fixed batch,
# the same model and mesh. Prints steady-state step time (train_summary.json), the process's
# peak RSS (GNU time) and the experts each task uses (90% of its load, eval/summary.json).
#   scripts/many_tasks_scale.sh [STEPS] [RUNS_DIR] [SIZES]     (SIZES: languages, "2 12 all")
set -euo pipefail
steps=${1:-30}
runs=${2:-/tmp/many_scale}
sizes=${3:-2 12 all}
for n in $sizes; do
  extra=()
  [ "$n" != all ] && extra=("tasks.1.max_languages=$n")
  /usr/bin/time -f "%M" -o "$runs.$n.rss" python -m moe.cli train configs/many_tasks.yaml \
    "${extra[@]}" "name=scale_$n" "runs_dir=$runs" "train.steps=$steps" train.log_every=10 \
    eval.every=0 checkpoint.every=0 eval.bleu_examples=0 >/dev/null
done
python - "$runs" $sizes <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print("| tasks | step time (ms) | peak RSS (GiB) | experts per task (90% of load, mean over layers) |")
print("|---|---|---|---|")
for n in sys.argv[2:]:
    run = runs / f"scale_{n}"
    ts = json.loads((run / "train_summary.json").read_text())
    usage = json.loads((run / "eval" / "summary.json").read_text()).get("expert_usage", {})
    counts = []
    for by_task in usage.values():
        for load in by_task.values():
            share, k = sorted(load, reverse=True), 0
            total = sum(share) or 1.0
            acc = 0.0
            while acc < 0.9 * total:
                acc += share[k]; k += 1
            counts.append(k)
    rss = int(Path(f"{runs}.{n}.rss").read_text().split()[-1]) / 2**20
    mean = sum(counts) / len(counts) if counts else float("nan")
    print(f"| {len(ts['data'])} | {ts['step_time_ms']:.0f} | {rss:.2f} | {mean:.1f} |")
PY
