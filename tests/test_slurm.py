"""SLURM templates on a real local SLURM (tests/slurm/local_cluster.sh starts it; .ci/run does so and sets
DIST_FT_SLURM_TESTS=1, which turns "no cluster" from a skip into a failure)."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
import tiny

TEMPLATES = sorted((REPO / "slurm").glob("*.sh"))
STEPS = 120


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("DIST_FT_SLURM_TESTS") == "1":
            pytest.fail(f"{tool} not installed (run tests/slurm/local_cluster.sh)")
        pytest.skip(f"{tool} not installed; run tests/slurm/local_cluster.sh to enable the SLURM tests")


@pytest.fixture(scope="module")
def cluster():
    _require("sbatch")
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if r.returncode != 0 or "idle" not in r.stdout.split() and "mix" not in r.stdout.split():
        if os.environ.get("DIST_FT_SLURM_TESTS") == "1":
            pytest.fail(f"local SLURM not up: {r.stdout} {r.stderr}")
        pytest.skip("local SLURM not running; start it with tests/slurm/local_cluster.sh")


@pytest.fixture(scope="module")
def job_cfg(tmp_path_factory, gpt2_dir) -> Path:
    return tiny.run_config(tmp_path_factory.mktemp("slurm"), gpt2_dir, 96, f"max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
                           "precision: fp32, zero_stage: 2")


def _sbatch(cfg: Path, out: Path, *overrides: str) -> str:
    """Submit the template as a user would, with CPU-sized resources for this one-node cluster."""
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        "--time=15", f"--output={out.parent / (out.name + '-%j.out')}", "slurm/finetune.sh", str(cfg),
                        f"output.dir={out}", *overrides], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(jid: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(jid: str, timeout: float = 600, finished: Path | None = None) -> dict:
    """Wait until the job ends for good. A job being requeued passes through ended-looking states, so with
    `finished` (a file the last part writes) an ended state counts only once that file exists."""
    deadline = time.time() + timeout
    held_since = None
    while time.time() < deadline:
        job = _job(jid)
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            # a requeued job is held ~2 min by default (until the old job credential expires); start it sooner
            # (test speed only), but not within seconds of the requeue: slurmd compares credential times in whole
            # seconds and kills a start in the same second as "Job credential revoked" (seen here)
            held_since = held_since or time.time()
            if time.time() - held_since >= 3:
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
        ended = job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        if ended and (finished is None or finished.exists()):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", jid])
    pytest.fail(f"job {jid} did not finish in {timeout} s: {_job(jid)}")


def test_templates_are_shellcheck_clean():
    _require("shellcheck")
    r = subprocess.run(["shellcheck", *map(str, TEMPLATES), str(REPO / "tests/slurm/local_cluster.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for t in TEMPLATES:
        if t.name != "job.sh":  # the submit scripts: signal before the time limit, requeue, log kept across requeues
            text = t.read_text()
            assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text


@pytest.fixture(scope="module")
def uninterrupted(cluster, job_cfg) -> Path:
    out = job_cfg.parent / "plain"
    job = _wait(_sbatch(job_cfg, out, "output.log_all_ranks=true", "track.wandb=disabled"))
    log = Path(str(out) + f"-{job['JobId']}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    return out


def test_sbatch_two_ranks_train_export_and_map_slurm_variables(uninterrupted):
    out = uninterrupted
    log = next(out.parent.glob("plain-*.out")).read_text()
    # both ranks ran, with the rank layout the template's variables give
    master = re.search(r"\[dist-ft\] job \d+ restart 0 \| 1 node\(s\), 2 tasks \| master (\S+)", log).group(1)
    assert f"rank 0 of 2 (local rank 0) | master {master} | gloo process group" in log
    assert f"rank 1 of 2 (local rank 1) | master {master} | gloo process group" in (out / "rank-1.log").read_text()
    assert "world 2 | ZeRO 2 | fp32" in log
    # the metrics file is complete and the export reloads
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x] == list(range(1, STEPS + 1))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    w = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in w.items())
    assert not (out / "wandb").exists()  # W&B off: nothing written


def test_preemption_checkpoints_requeues_and_resumes_exactly(uninterrupted, job_cfg):
    out = job_cfg.parent / "preempted"
    # output.overwrite replaces another run, never this job's own: the requeued part continues its checkpoints
    jid = _sbatch(job_cfg, out, "track.wandb=offline", "output.overwrite=true")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        assert time.time() < deadline and _job(jid).get("JobState") in ("PENDING", "RUNNING"), _job(jid)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # what --signal=USR1@grace sends before the limit
    job = _wait(jid, finished=out / "final" / "model.safetensors")
    log = Path(str(out) + f"-{jid}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", (job, log[-3000:])
    stopped = int(re.search(r"stopped by signal after step (\d+); exit 75", log).group(1))
    assert 10 <= stopped < STEPS
    assert f"requeueing job {jid}" in log and f"job {jid} restart 1" in log
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'}: step {stopped}" in log
    # the two parts equal one uninterrupted job: every loss and every weight, bitwise
    assert tiny.losses(out) == tiny.losses(uninterrupted)
    wa, wb = load_file(uninterrupted / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # one W&B run across both parts
    ids = tiny.wandb_run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids
