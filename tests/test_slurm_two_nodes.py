"""Two SLURM nodes, one rank on each: dftn1 and dftn2, each slurmd in its own network and UTS namespace
(tests/slurm/two_nodes.sh), so the rendezvous, gloo and checkpoints cross hosts as on a real cluster. Every run is
held to the one-node two-rank reference (tests/slurm_jobs.py): bitwise, since the ranks, the reduction order and
the samples are the same; only the wire between the ranks differs."""

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import tiny
import torch
from helpers import REPO
from safetensors.torch import load_file
from slurm_jobs import STEPS, job, log, require, sbatch, wait, wait_for_steps

NODES = REPO / "tests" / "slurm" / "two_nodes.sh"
EVERY = 20  # checkpoint cadence of the two-node runs


def _nodes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NODES), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_nodes(cluster):
    require("ip")
    r = _nodes("up")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        states = subprocess.run(
            ["sinfo", "-h", "-N", "-p", "two", "-o", "%N %t"], capture_output=True, text=True
        ).stdout.split("\n")
        assert sorted(x for x in states if x) == ["dftn1 idle", "dftn2 idle"], states
        yield
    finally:
        r = _nodes("down")
        assert r.returncode == 0, r.stderr
        assert "dftn" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _submit(job_cfg: Path, out: Path, *overrides: str) -> str:
    return sbatch(
        job_cfg,
        out,
        f"checkpoint.every_steps={EVERY}",
        *overrides,
        nodes=2,
        tasks_per_node=1,
        partition="two",
    )


@pytest.fixture(scope="module")
def across(two_nodes, job_cfg, uninterrupted) -> Path:
    out = job_cfg.parent / "two-nodes"
    state = wait(
        _submit(
            job_cfg,
            out,
            "output.log_all_ranks=true",
            "track.wandb=disabled",
            f"checkpoint.keep_every={2 * EVERY}",
        )
    )
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log(out, state["JobId"])[-3000:]
    return out


def test_one_rank_per_node_equals_two_ranks_on_one_node(across, uninterrupted):
    text = next(across.parent.glob("two-nodes-[0-9]*.out")).read_text()
    port = re.search(r"\| 2 node\(s\), 2 tasks \| master dftn1:(\d+)", text).group(1)
    # each rank on its own host, meeting at rank 0's host over the namespaces' network
    assert f"rank 0 of 2 (local rank 0) on dftn1 | master dftn1:{port} | gloo process group" in text
    assert (
        f"rank 1 of 2 (local rank 0) on dftn2 | master dftn1:{port} | gloo process group"
        in (across / "rank-1.log").read_text()
    )
    # both ranks wrote their optimizer partition into the shared checkpoint directory
    kept = sorted(int(p.name[5:]) for p in (across / "checkpoints").iterdir())
    # milestones (keep_every) + the newest two
    assert kept == [2 * EVERY, 4 * EVERY, STEPS - EVERY, STEPS], kept
    assert (
        len(list((across / "checkpoints" / f"step-{STEPS}").rglob("*zero_pp_rank_[01]_*optim_states.pt")))
        == 2
    )
    # every loss and every weight bitwise equal to two ranks on one node
    assert tiny.losses(across) == tiny.losses(uninterrupted)
    assert _same_weights(across, uninterrupted)


def test_preemption_across_nodes_resumes_exactly(across, job_cfg):
    out = job_cfg.parent / "two-nodes-preempted"
    jid = _submit(job_cfg, out, "track.wandb=offline")
    wait_for_steps(jid, out, 10)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # both ranks, on both hosts, get it
    state = wait(jid, finished=out / "final" / "model.safetensors")
    text = log(out, jid)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text[-3000:])
    stopped = int(re.search(r"stopped by signal after step (\d+); exit 75", text).group(1))
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'}: step {stopped}" in text
    assert text.count("| 2 node(s), 2 tasks | master dftn1:") == 2  # both parts on the two nodes
    assert tiny.losses(out) == tiny.losses(across) and _same_weights(out, across)
    ids = tiny.wandb_run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids


def test_a_node_dies_the_job_fails_fast_requeues_and_ends_exact(across, job_cfg):
    """dftn2 loses power mid-run (its slurmd, step daemon and rank: SIGKILL). The job must end its part in seconds
    (the surviving rank's collective fails on the closed connection; srun ends the step), requeue itself, wait for
    two nodes, and resume from the last complete checkpoint to the very weights of the uninterrupted run."""
    out = job_cfg.parent / "two-nodes-node-dies"
    jid = _submit(job_cfg, out, "track.wandb=disabled")
    wait_for_steps(jid, out, 2 * EVERY + 5)
    killed_at = time.time()
    assert _nodes("kill", "2").returncode == 0
    while job(jid).get("JobState") == "RUNNING" and "requeueing it" not in log(out, jid):
        assert time.time() - killed_at < 120, "the job hung after losing a node"
        time.sleep(0.2)
    detected_s = time.time() - killed_at
    assert _nodes("start", "2").returncode == 0  # the node is repaired and returns
    state = wait(jid, finished=out / "final" / "model.safetensors")
    text = log(out, jid)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) >= 1, (state, text[-3000:])
    resumed = int(
        re.search(rf"resumed from {re.escape(str(out / 'checkpoints'))}/step-(\d+): step \d+", text).group(1)
    )
    assert resumed >= 2 * EVERY and resumed % EVERY == 0
    assert tiny.losses(out) == tiny.losses(across) and _same_weights(out, across)
    print(f"node loss: part ended {detected_s:.1f} s after the kill; resumed from step {resumed}")


def test_a_killed_rank_is_retried_by_the_job_script(across, job_cfg):
    """Only rank 1's process dies (the OOM killer, a segfault): its node stays up, so the step ends at once; job.sh
    sees a failure that is not the input's fault, counts it in the job's comment and requeues the job."""
    out = job_cfg.parent / "two-nodes-rank-killed"
    jid = _submit(job_cfg, out, "track.wandb=disabled")
    wait_for_steps(jid, out, EVERY + 5)
    pids = subprocess.run(["ip", "netns", "pids", "dftn2"], capture_output=True, text=True).stdout.split()
    rank1 = [
        p
        for p in pids
        if "launch/train.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert len(rank1) == 1, pids
    subprocess.run(["kill", "-9", rank1[0]], check=True)
    state = wait(jid, finished=out / "final" / "model.safetensors")
    text = log(out, jid)
    assert (
        state["JobState"] == "COMPLETED"
        and state["Restarts"] == "1"
        and state["Comment"] == "dist-ft-failures=1"
    ), (state, text[-3000:])
    assert re.search(
        rf"job {jid} failed with exit \d+ \(failure 1 of at most 2 retried\); requeueing it", text
    ), text[-3000:]
    resumed = int(
        re.search(rf"resumed from {re.escape(str(out / 'checkpoints'))}/step-(\d+): step \d+", text).group(1)
    )
    assert resumed >= EVERY and resumed % EVERY == 0
    assert tiny.losses(out) == tiny.losses(across) and _same_weights(out, across)


def test_two_node_checkpoint_resumes_on_one_node(across, job_cfg):
    """Elastic: the two-node job's newest checkpoint before the end continues as a one-node, one-rank ZeRO-1 job with
    the same global batch (micro 4 x 1 rank = 2 x 2), through the universal checkpoint: equal up to reduction order
    (as tests/test_checkpoint.py's reshard tests, over a tail of the same length scale)."""
    out, at = job_cfg.parent / "two-nodes-to-one", STEPS - EVERY
    shutil.copytree(
        across, out, ignore=shutil.ignore_patterns("final", "rank-*.log", "metrics-rank-*", f"step-{STEPS}")
    )
    jid = sbatch(
        job_cfg,
        out,
        "train.micro_batch_size=4",
        "engine.zero_stage=1",
        "track.wandb=disabled",
        tasks_per_node=1,
    )
    state = wait(jid)
    text = log(out, jid)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert (
        f"resumed from {out / 'checkpoints' / f'step-{at}'} (resharded to this world size / ZeRO stage): step {at}"
        in text
    )
    ref, got = tiny.losses(across), tiny.losses(out)
    assert len(got) == STEPS and got[:at] == ref[:at]
    assert max(abs(a - b) for a, b in zip(ref, got, strict=False)) < 2e-5, (ref, got)
    wa, wb = load_file(across / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=0)
