#!/usr/bin/env bash
# Lint, format and type checks, as CI runs them (before the tests): `bash scripts/check.sh`.
# `bash scripts/check.sh --fix` applies ruff's safe fixes and formats in place first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -m ruff --version >/dev/null 2>&1 || ! "$PY" -m mypy --version >/dev/null 2>&1; then
  "$PY" -m pip install -q "ruff==0.17.6" "mypy==2.4.1"  # as pyproject's dev extra (no reinstall of dist_ft or torch)
fi
if [ "${1:-}" = "--fix" ]; then
  "$PY" -m ruff check --fix -q dist_ft tests bench scripts || true
  "$PY" -m ruff format -q dist_ft tests bench scripts
fi
"$PY" -m ruff check dist_ft tests bench scripts
"$PY" -m ruff format --check dist_ft tests bench scripts
"$PY" -m mypy
echo "checks passed: ruff (lint + format), mypy"
