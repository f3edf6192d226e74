#!/usr/bin/env bash
# The test command (README.md): set up whatever is missing, lint, then run every test.
# Extra arguments go to pytest, for example: scripts/test.sh -m "not slow" tests/api
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash devcluster/scripts/setup.sh
venv=${KUBELM_VENV:-.venv}

echo "== lint" >&2
"$venv/bin/ruff" check .
"$venv/bin/lint-imports" --no-cache
"$venv/bin/mypy"
# CPython refuses some programs ruff's parser accepts (a name used before its global declaration).
"$venv/bin/python" -c 'import pathlib, sys
for p in (p for d in sys.argv[1:] for p in pathlib.Path(d).rglob("*.py")):
    compile(p.read_text(), str(p), "exec")' bench scripts contract operator runtime devcluster tests

echo "== tests" >&2
"$venv/bin/python" -m pytest "$@"
