"""SLURM templates on a real local SLURM, one node (vm) with two ranks: the layout, exports, preemption and
requeue (helpers and the shared reference run: tests/slurm_jobs.py)."""

import json
import os
import re
import socket
import subprocess

import tiny
import torch
from helpers import REPO
from safetensors.torch import load_file
from slurm_jobs import STEPS, log, require, sbatch, wait, wait_for_steps

TEMPLATES = sorted((REPO / "slurm").glob("*.sh"))


def test_templates_are_shellcheck_clean():
    require("shellcheck")
    r = subprocess.run(
        ["shellcheck", *map(str, TEMPLATES), *map(str, (REPO / "tests/slurm").glob("*.sh"))],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout
    for t in TEMPLATES:
        # the submit scripts: signal before the time limit, requeue, log kept across requeues
        if t.name != "job.sh":
            text = t.read_text()
            assert (
                "#SBATCH --signal=USR1@" in text
                and "#SBATCH --requeue" in text
                and "#SBATCH --open-mode=append" in text
            )


def test_sbatch_two_ranks_train_export_and_map_slurm_variables(uninterrupted):
    out = uninterrupted
    log = next(out.parent.glob("plain-*.out")).read_text()
    # both ranks ran, with the rank layout the template's variables give
    master = re.search(r"\[dist-ft\] job \d+ restart 0 \| 1 node\(s\), 2 tasks \| master (\S+)", log).group(1)
    host = socket.gethostname()
    assert f"rank 0 of 2 (local rank 0) on {host} | master {master} | gloo process group" in log
    assert (
        f"rank 1 of 2 (local rank 1) on {host} | master {master} | gloo process group"
        in (out / "rank-1.log").read_text()
    )
    assert "world 2 | ZeRO 2 | fp32" in log
    # the metrics file is complete and the export reloads
    assert [
        json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ] == list(range(1, STEPS + 1))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    w = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in w.items())
    assert not (out / "wandb").exists()  # W&B off: nothing written


def test_preemption_checkpoints_requeues_and_resumes_exactly(uninterrupted, job_cfg):
    out = job_cfg.parent / "preempted"
    # output.overwrite replaces another run, never this job's own: the requeued part continues its checkpoints
    jid = sbatch(job_cfg, out, "track.wandb=offline", "output.overwrite=true")
    wait_for_steps(jid, out, 10)
    # what --signal=USR1@grace sends before the limit
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)
    state = wait(jid, finished=out / "final" / "model.safetensors")
    text = log(out, jid)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "1", (
        state,
        text[-3000:],
    )
    stopped = int(re.search(r"stopped by signal after step (\d+); exit 75", text).group(1))
    assert 10 <= stopped < STEPS
    assert f"requeueing job {jid}" in text and f"job {jid} restart 1" in text
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'}: step {stopped}" in text
    # the two parts equal one uninterrupted job: every loss and every weight, bitwise
    assert tiny.losses(out) == tiny.losses(uninterrupted)
    wa, wb = (
        load_file(uninterrupted / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # one W&B run across both parts
    ids = tiny.wandb_run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids


def test_each_task_gets_the_cpus_it_asked_for(cluster, tmp_path):
    """`sbatch --cpus-per-task=2`: srun (SLURM >= 22.05) no longer passes that on to its step by itself, so the step
    asks for one CPU per task (what task/affinity or task/cgroup then bind each task to) while OMP_NUM_THREADS says 2.
    The template's task (PYTHON replaced by a probe) must run in a step that asked for 2 CPUs per task
    (`TresPerTask=cpu:2` in scontrol show step), with OMP_NUM_THREADS 2. This cluster's TaskPlugin=task/none binds no
    task to CPUs, so the step's request, not the task's affinity, is what shows it (the affinity is at least 2 here)."""
    # stands in for python: `$PYTHON launch/train.py CONFIG ...` reports what the task got
    probe = tmp_path / "probe.sh"
    probe.write_text(
        '#!/bin/sh\nstep=$(scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID")\necho "$step"\n'
        'echo "TASK $SLURM_PROCID omp=$OMP_NUM_THREADS nproc=$(nproc)'
        ' per_task=$(echo "$step" | sed -n "s/.*TresPerTask=cpu:\\([0-9]*\\).*/\\1/p" | head -n 1)"\n'
    )
    probe.chmod(0o755)
    out = tmp_path / "cpus"
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=debug",
            "--nodes=1",
            "--ntasks-per-node=1",
            "--cpus-per-task=2",
            "--gpus-per-node=0",
            "--time=5",
            f"--output={out}-%j.out",
            "slurm/finetune-1node.sh",
            str(probe),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(probe)},
    )
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    state = wait(jid, timeout=120)
    text = log(out, jid)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-3000:])
    tasks = re.findall(r"TASK (\d+) omp=(\d+) nproc=(\d+) per_task=(\d*)", text)
    assert len(tasks) == 1, text
    _, omp, nproc, per_task = tasks[0]
    # without SRUN_CPUS_PER_TASK the step asks for 1 CPU per task (none shown)
    assert (omp, per_task) == ("2", "2"), text
    assert int(nproc) >= 2, text
    assert "[dist-ft] each task: 2 CPU(s) (SRUN_CPUS_PER_TASK), OMP_NUM_THREADS=2" in text, text


def test_doctor_inside_a_job_reads_the_rank_layout_as_train_does(cluster, tmp_path):
    """`dist-ft doctor --json` in each task of a 2-task job step: the rank layout dist.py derives from SLURM's
    variables (no RANK/WORLD_SIZE set), the job's variables, and the launch found workable."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    step = f"cd {REPO} && {sys.executable} -m dist_ft doctor --json > {tmp_path}/doctor-$SLURM_PROCID.json"
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=debug",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=5",
            f"--output={tmp_path}/doctor-%j.out",
            "--wrap",
            f"srun bash -c '{step}'",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    state = wait(jid, timeout=300)
    assert state["JobState"] == "COMPLETED", (state, (tmp_path / f"doctor-{jid}.out").read_text()[-2000:])
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"doctor-{rank}.json").read_text())
        launch = rep["launch"]
        assert (launch["rank"], launch["world_size"], launch["local_rank"]) == (rank, 2, rank), launch
        assert launch["launcher"] == "slurm" and launch["backend"] == "gloo"
        assert rep["slurm"]["SLURM_JOB_ID"] == jid and rep["slurm"]["SLURM_NTASKS"] == "2"
        assert not any(p.startswith("launch:") for p in rep["problems"])
