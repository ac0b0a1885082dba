#!/usr/bin/env bash
# Repeated growth at many tasks (issue 13): train configs/many_tasks_grow_base.yaml (109 tasks,
# en-eu, en-ga, en-ka reserved at weight 0), then add the three languages one after another with
# `moe grow` (8 new experts per MoE layer each: 64 -> 72 -> 80 -> 88, divisible by the expert
# axis). After each grow `moe grow` compares every earlier task with the parent: the line
# "N/N old task(s) evaluate bit-identically" and grow.json's old_tasks_after.
#   scripts/grow_many.sh [BASE_STEPS] [GROW_STEPS] [RUNS_DIR]
set -euo pipefail
base_steps=${1:-3000}
grow_steps=${2:-500}
runs=${3:-runs}
moe() { python -m moe.cli "$@"; }
moe train configs/many_tasks_grow.yaml "train.steps=$base_steps" "runs_dir=$runs"
parent="$runs/many_tasks_grow_base"
for lang in eu ga ka; do
  cat > "/tmp/grow_many_$lang.yaml" <<YAML
name: many_tasks_grow_$lang
runs_dir: $runs
grow: {task: en-$lang, add_experts: 8, share_experts: 2, probe_batches: 4}
train: {steps: $grow_steps, learning_rate: 0.002, warmup_steps: 50, log_every: 50}
eval: {every: 0}
checkpoint: {every: 0}
YAML
  moe grow "$parent" --config "/tmp/grow_many_$lang.yaml"
  parent="$runs/many_tasks_grow_$lang"
done
python scripts/grow_compare.py "$runs/many_tasks_grow_base" "$parent" "$runs/many_tasks" || true
