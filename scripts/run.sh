#!/usr/bin/env bash
# Set up .venv (once) and run the main job: the quickstart experiment on the embedded default data.
# Extra arguments are config overrides, e.g. ./scripts/run.sh train.steps=50
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
moe train configs/quickstart.yaml "$@"
