"""Submitting and watching jobs on the real local SLURM (tests/slurm/local_cluster.sh starts it; .ci/run does so
and sets DIST_FT_SLURM_TESTS=1, which turns "no cluster" from a skip into a failure). A pytest plugin (named in
conftest.py), so the one-node reference run is made once and shared by the one- and two-node tests."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import tiny
from helpers import REPO

STEPS = 120


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("DIST_FT_SLURM_TESTS") == "1":
            pytest.fail(f"{tool} not installed (run tests/slurm/local_cluster.sh)")
        pytest.skip(f"{tool} not installed; run tests/slurm/local_cluster.sh to enable the SLURM tests")


@pytest.fixture(scope="session")
def cluster():
    require("sbatch")
    r = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.split() not in (["idle"], ["mix"]):
        if os.environ.get("DIST_FT_SLURM_TESTS") == "1":
            pytest.fail(f"local SLURM not up: {r.stdout} {r.stderr}")
        pytest.skip("local SLURM not running; start it with tests/slurm/local_cluster.sh")


@pytest.fixture(scope="session")
def job_cfg(tmp_path_factory, gpt2_dir) -> Path:
    return tiny.run_config(
        tmp_path_factory.mktemp("slurm"),
        gpt2_dir,
        96,
        f"max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
        "precision: fp32, zero_stage: 2",
    )


def sbatch(
    cfg: Path, out: Path, *overrides: str, nodes: int = 1, tasks_per_node: int = 2, partition: str = "debug"
) -> str:
    """Submit the template as a user would, with CPU-sized resources for this cluster."""
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--partition={partition}",
            f"--nodes={nodes}",
            f"--ntasks-per-node={tasks_per_node}",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=15",
            f"--output={out.parent / (out.name + '-%j.out')}",
            "slurm/finetune.sh",
            str(cfg),
            f"output.dir={out}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job(jid: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def log(out: Path, jid: str) -> str:
    return Path(str(out) + f"-{jid}.out").read_text()


def wait(jid: str, timeout: float = 600, finished: Path | None = None) -> dict:
    """Wait until the job ends for good. A job being requeued passes through ended-looking states, so with
    `finished` (a file the last part writes) an ended state counts only once that file exists."""
    deadline = time.time() + timeout
    held_since = None
    while time.time() < deadline:
        state = job(jid)
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
            # a requeued job is held ~2 min by default (until the old job credential expires); start it sooner
            # (test speed only), but not within seconds of the requeue: slurmd compares credential times in whole
            # seconds and kills a start in the same second as "Job credential revoked" (seen here)
            held_since = held_since or time.time()
            if time.time() - held_since >= 3:
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
        ended = state.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        )
        if ended and (finished is None or finished.exists()):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", jid])
    pytest.fail(f"job {jid} did not finish in {timeout} s: {job(jid)}")


def wait_for_steps(jid: str, out: Path, steps: int, timeout: float = 300) -> None:
    """Block until the running job logged `steps` training steps."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= steps):
        assert time.time() < deadline and job(jid).get("JobState") in ("PENDING", "RUNNING"), job(jid)
        time.sleep(0.1)


@pytest.fixture(scope="session")
def uninterrupted(cluster, job_cfg) -> Path:
    """One node, two ranks, 120 steps, nothing in the way: the reference every other SLURM run is held to."""
    out = job_cfg.parent / "plain"
    state = wait(sbatch(job_cfg, out, "output.log_all_ranks=true", "track.wandb=disabled"))
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log(out, state["JobId"])[-3000:]
    return out
