# Sourced by run.sh and test.sh: create .venv once, reinstall only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRA="${1:-}"
STAMP="$VENV/.installed${EXTRA:+-$EXTRA}"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "moe: creating $VENV (first run only)" >&2
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "moe: installing the package and its dependencies into .venv" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRA:+[$EXTRA]}" >&2
  echo "$want" > "$STAMP"
fi
# tcmalloc (Debian's libtcmalloc-minimal4): XLA's CPU kernels touch freshly allocated buffers,
# and glibc's malloc returns them to the kernel, so every step page-faults them back in
# (docs/results.md: 12-47% of a step). `moe` preloads it when present; without root or apt the
# install is skipped and training only loses that speed-up.
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ ! -e "$TCMALLOC" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "moe: installing libtcmalloc-minimal4 (apt, once)" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4; }; \
  } >/dev/null 2>&1 || echo "moe: libtcmalloc-minimal4 could not be installed; going on without it" >&2
fi
export PATH="$VENV/bin:$PATH"
