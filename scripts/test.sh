#!/usr/bin/env bash
# Set up .venv with the test extra (once) and run the test suite. Arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
cd "$ROOT"
exec python -m pytest "$@"
