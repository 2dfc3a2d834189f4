"""GPU tier fixtures. `python3 -m pytest -q tests/gpu` on a machine with one CUDA GPU; every test skips without CUDA.

tests/conftest.py (a parent directory's conftest) is loaded too: `gpt2_dir`, `llama_dir` and the per-session
shard cache come from there; `run_cli` and the other shared helpers from tests/helpers.py. Every run in test_gpu.py
is one rank on one GPU (NCCL process group of size 1); test_multi_gpu.py runs two ranks where at least two GPUs are
visible.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # tiny.py and helpers.py
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def det_env() -> dict:
    """Environment for runs compared bitwise: deterministic cuBLAS workspaces (needed for bit-identical GEMMs)."""
    return {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}


@pytest.fixture
def repo_pythonpath() -> dict:
    """Helper scripts run as plain `python file.py`: make the checkout importable even if dist_ft is not installed."""
    root = str(TESTS.parent)
    return {
        "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    }
