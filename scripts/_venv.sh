# Sourced by scripts/demo and scripts/test: make .venv (Python 3.11+) and install the given extra into it.
# Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "tiered_sessions needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2; exit 1; }
VENV="${TIERED_SESSIONS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$1-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$1]"
  rm -f "$VENV"/.installed-"$1"-*
  touch "$stamp"
fi
