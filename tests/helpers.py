"""Helpers shared by several test modules: the checkout's path, a free port, CLI and launcher commands,
run checks. Tests import them as `from helpers import ...` (tests/conftest.py puts tests/ on sys.path, as
for tiny.py). No tests here, and only the standard library at import time: tests/gpu/fp16_overflow.py, a
plain script, imports it too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `dist-ft ...` as users do (a subprocess), returning CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "dist_ft", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def train_cmd(cfg: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    """`dist-ft train` for 1 rank, else the deepspeed launcher with `ranks` CPU ranks on a free port."""
    args = [str(cfg), f"output.dir={out}", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "dist_ft", "train", *args]
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "launch/train.py",
        *args,
    ]


def run_cmd(cmd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `cmd` from the checkout in its own session, text output captured, env_extra over os.environ."""
    env = {**os.environ, **(env_extra or {})}
    # own session: the kill hook SIGKILLs the whole process group, as a node failure would
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )


def train_args(tmp_path: Path, model: Path, train: Path, *extra: str) -> list[str]:
    """Write a small fp32 config to tmp_path/run.yaml; return `train` args with output.dir=tmp_path/out."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\ndata: {{train: {train}, max_seq_len: 128}}\n"
        "train: {micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 2}\nengine: {precision: fp32}\n"
    )
    return ["train", str(cfg), f"output.dir={tmp_path / 'out'}", *extra]


def metric_records(out: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (blank lines skipped)."""
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a process exited 0 (else show the ends of its stdout and stderr); return it."""
    assert r.returncode == 0, (
        f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    )
    return r


def assert_clean_failure(r, pattern, out):
    """Exit 2 with one `error: ` line matching `pattern`, no traceback, and (if `out`) no run output."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    if out is not None:
        assert not (out / "final").exists() and not (out / "config.yaml").exists()


def assert_identical_runs(a: Path, b: Path) -> None:
    """Two run directories have bitwise-equal per-step losses and final weights."""
    import torch
    from safetensors.torch import load_file

    assert tiny.losses(a) == tiny.losses(b)  # bitwise: floats are stored at full precision
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
