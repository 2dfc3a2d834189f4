"""`dist-ft doctor`: the report a bug report needs, read from this machine and the launcher's variables as
`dist-ft train` reads them, without printing a secret."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from helpers import free_port, run_cli

SECRET = "wandb-secret-0123456789abcdef"


@pytest.mark.unit
def test_doctor_reports_versions_launch_slurm_disk_and_wandb_without_secrets(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: m}}\ndata: {{train: t.jsonl}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    dead = free_port()  # nothing listens: W&B's host does not answer
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29511",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "WANDB_API_KEY": SECRET,
        "WANDB_BASE_URL": f"http://127.0.0.1:{dead}",
        "WANDB_MODE": "online",
    }
    r = run_cli("doctor", str(cfg), "--json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert SECRET not in r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["versions"]["torch"] == torch.__version__ and rep["versions"]["deepspeed"]
    assert rep["deepspeed_ops"]["cpu_adam"] is True
    launch = rep["launch"]
    assert (launch["rank"], launch["world_size"], launch["local_rank"]) == (1, 2, 1)
    assert launch["master"] == "node7:29511" and launch["backend"] == "gloo" and launch["device"] == "cpu"
    assert rep["slurm"] == {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2"}
    assert (
        rep["disk"]["output.dir"]["path"] == str(tmp_path / "run")
        and rep["disk"]["output.dir"]["free_gb"] > 0
    )
    assert rep["wandb"] == {
        "host": f"127.0.0.1:{dead}",
        "reachable": False,
        "api_key_set": True,
        "mode": "online",
    }
    assert any(p.startswith("wandb: a key is set but") for p in rep["problems"])
    assert rep["devices"]["precision_auto"] in ("bf16-autocast", "fp32") and rep["devices"]["gpus"] == []

    # a host that answers; a launch that cannot work is named; the table for a terminal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        bad = {**env, "RANK": "5", "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}
        r = run_cli("doctor", env=bad)
    assert r.returncode == 0 and SECRET not in r.stdout
    assert "launch (as dist-ft train reads it)" in r.stdout and "reachable    True" in r.stdout
    problems = r.stdout.split("problems")[-1]
    assert "launch:" in problems and "RANK=5" in problems, problems
