# Sourced by scripts/serve and scripts/test: make .venv and install the project into it when needed.
# Usage: cborg_env EXTRAS   (e.g. "cpu" or "cpu,dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CBORG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

cborg_env() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
      || { echo "CBorg needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }
    echo "==> creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  # Reinstall only when pyproject.toml or the extras changed.
  local stamp="$VENV/.cborg-installed" want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16) $extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing cborg[$extras] into $VENV (first time: a few minutes)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]" >&2
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}
