"""Fault tolerance: bit-exact resume after SIGKILL, crash during save, signal -> save + exit 75."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_distributed import _port
import tiny

STEPS = 12


def _assert_identical(a: Path, b: Path) -> None:
    assert tiny.losses(a) == tiny.losses(b)  # bitwise: floats are stored at full precision
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _cmd(cfg: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    args = [str(cfg), f"output.dir={out}", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "dist_ft", "train", *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(_port()), "launch/train.py", *args]


def _run(cmd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    # own session: the kill hook SIGKILLs the whole process group, as a node failure would
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, gpt2_dir):
    return tiny.run_config(tmp_path_factory.mktemp("ckpt"), gpt2_dir, 96, f"max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
                           "precision: fp32", "checkpoint: {every_steps: 3}\n")


@pytest.fixture(scope="module")
def reference(cfg):
    refs = {}
    for ranks, stage in ((1, 0), (2, 2)):
        out = cfg.parent / f"ref-{ranks}"
        r = _run(_cmd(cfg, out, ranks, f"engine.zero_stage={stage}"))
        assert r.returncode == 0, r.stderr[-3000:]
        refs[ranks] = out
    return refs


@pytest.mark.parametrize("ranks,kill_at", [(1, 4), (1, 7), (1, 11), (2, 5), (2, 10)])
def test_resume_after_sigkill_is_bit_exact(cfg, reference, ranks, kill_at):
    out = cfg.parent / f"kill-{ranks}-{kill_at}"
    stage = "engine.zero_stage=0" if ranks == 1 else "engine.zero_stage=2"
    r = _run(_cmd(cfg, out, ranks, stage), {"DIST_FT_TEST_KILL_AT_STEP": str(kill_at)})
    assert r.returncode != 0 and not (out / "final").exists()
    r = _run(_cmd(cfg, out, ranks, stage))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{kill_at // 3 * 3}'}" in r.stdout
    _assert_identical(reference[ranks], out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-9"]  # keep: 2


def test_crash_during_save_keeps_previous_checkpoint(cfg, reference):
    out = cfg.parent / "crash-in-save"
    proc = subprocess.Popen(_cmd(cfg, out, 1), cwd=REPO, env={**os.environ, "DIST_FT_TEST_PAUSE_IN_SAVE": "6"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out / "checkpoints" / "step-6.tmp"
    deadline = time.time() + 300
    while not (partial / "config.yaml").exists():  # engine state written, manifest not yet
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-6").exists()
    r = _run(_cmd(cfg, out, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-3" in r.stdout
    _assert_identical(reference[1], out)


def test_signal_saves_and_exits_75_then_resumes_exactly(cfg, tmp_path):
    n = 60
    ref = tmp_path / "ref"
    assert _run(_cmd(cfg, ref, 1, f"train.max_steps={n}", "checkpoint.every_steps=0")).returncode == 0
    out = tmp_path / "sig"
    proc = subprocess.Popen(_cmd(cfg, out, 1, f"train.max_steps={n}", "checkpoint.every_steps=0"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    sent = time.time()
    while not (out / "checkpoints").exists():  # a second signal while the save is under way changes nothing
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert time.time() - sent < 60
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-") and int(saved[0][5:]) < n
    r = _run(_cmd(cfg, out, 1, f"train.max_steps={n}", "checkpoint.every_steps=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_identical(ref, out)


def test_resumed_job_continues_the_same_wandb_run_and_leaks_no_secret(cfg, reference):
    out = cfg.parent / "wandb-resume"
    secret = {"WANDB_API_KEY": "sk-dist-ft-test-" + "7" * 24, "HF_TOKEN": "hf_dist_ft_test_token_123456"}
    r = _run(_cmd(cfg, out, 1, "track.wandb=offline"), {"DIST_FT_TEST_KILL_AT_STEP": "7", **secret})
    assert r.returncode != 0
    r = _run(_cmd(cfg, out, 1, "track.wandb=offline"), secret)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = tiny.wandb_run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids  # one run, two parts
    _assert_identical(reference[1], out)  # tracking does not change training
    for f in out.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert all(v.encode() not in blob for v in secret.values()), f


def test_resume_refuses_incompatible_config_but_allows_more_steps(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "cont"
    shutil.copytree(reference[1], out)
    shutil.rmtree(out / "final")
    r = _run(_cmd(cfg, out, 1, "train.micro_batch_size=3"))
    assert r.returncode == 2 and "config differs from the checkpoint in train.micro_batch_size" in r.stderr
    r = _run(_cmd(cfg, out, 1, f"train.max_steps={STEPS + 3}"))
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 12" in r.stdout
    assert len(tiny.losses(out)) == STEPS + 3


def test_corrupt_latest_checkpoint_falls_back(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(reference[1], out)
    shutil.rmtree(out / "final")
    victim = next((out / "checkpoints" / "step-12" / "ds").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: size no longer matches the manifest
    r = _run(_cmd(cfg, out, 1))
    assert r.returncode == 0 and f"resumed from {out / 'checkpoints' / 'step-9'}" in r.stdout
    assert f"; skipped damaged step-12 (ds/{victim.relative_to(out / 'checkpoints' / 'step-12' / 'ds')}: 100 bytes, expected" in r.stdout


def test_keep_every_holds_milestones_and_rotation_keeps_the_newest(cfg, tmp_path):
    out = tmp_path / "milestones"
    r = _run(_cmd(cfg, out, 1, "checkpoint.every_steps=2", "checkpoint.keep=2", "checkpoint.keep_every=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir()) == [4, 8, 10, 12]
    saves = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "checkpoint_save_s" in x]
    assert [s["step"] for s in saves] == [2, 4, 6, 8, 10, 12] and all(s["checkpoint_save_s"] > 0 for s in saves)


@pytest.mark.parametrize("stage_before,ranks_after,stage_after", [(2, 1, 2), (2, 2, 1), (1, 1, 2)])
def test_resume_on_another_world_size_or_zero_stage_keeps_the_run(cfg, reference, tmp_path, stage_before, ranks_after, stage_after):
    """2 ranks die after step 7 (checkpoint 6); the job continues on `ranks_after` ranks with ZeRO
    `stage_after`, the same global batch (micro x world constant), through DeepSpeed's universal checkpoint.
    The rest of the run equals the uninterrupted 2-rank run up to reduction-order rounding."""
    out = tmp_path / "elastic"
    r = _run(_cmd(cfg, out, 2, f"engine.zero_stage={stage_before}"), {"DIST_FT_TEST_KILL_AT_STEP": "7"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-6").is_dir()
    micro = 2 * 2 // ranks_after
    r = _run(_cmd(cfg, out, ranks_after, f"engine.zero_stage={stage_after}", f"train.micro_batch_size={micro}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-6'} (resharded to this world size / ZeRO stage): step 6" in r.stdout
    ref, got = tiny.losses(reference[2]), tiny.losses(out)
    assert len(got) == STEPS and max(abs(a - b) for a, b in zip(ref[:6], got[:6])) < 2e-5
    assert max(abs(a - b) for a, b in zip(ref, got)) < 2e-5, (ref, got)  # the same samples, the same optimizer state
    wa, wb = load_file(reference[2] / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=0)


def test_reshard_refuses_a_changed_global_batch(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "elastic-bad"
    shutil.copytree(reference[2], out)
    shutil.rmtree(out / "final")
    r = _run(_cmd(cfg, out, 1, "engine.zero_stage=2"))  # 1 rank x micro 2 = 2 rows, the checkpoint had 4
    assert r.returncode == 2
    assert "saved with 2 ranks (global batch 4), this run has 1 ranks (global batch 2)" in r.stderr
    assert "micro x accum x world = 4" in r.stderr
    r = _run(_cmd(cfg, out, 2, "engine.zero_stage=3"))  # ZeRO-3 is not resharded (not exact): said up front
    assert r.returncode == 2 and "resharding to another world size / ZeRO stage works for ZeRO stages 1 and 2" in r.stderr



def test_resume_with_dropout_is_bit_exact(tmp_path, gpt2_dropout_dir):
    """Dropout 0.1: the resumed run draws the same masks as the uninterrupted one only if every RNG state
    (Python, NumPy, torch CPU, and each rank's CUDA generator on GPUs) was saved and restored."""
    cfg = tiny.run_config(tmp_path, gpt2_dropout_dir, 48, "max_steps: 6, micro_batch_size: 2, lr: 3.0e-3", "precision: fp32",
                          "checkpoint: {every_steps: 2}\n")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _run(_cmd(cfg, ref, 1)).returncode == 0
    r = _run(_cmd(cfg, out, 1), {"DIST_FT_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    r = _run(_cmd(cfg, out, 1))
    assert r.returncode == 0 and f"resumed from {out / 'checkpoints' / 'step-2'}" in r.stdout, r.stderr[-3000:]
    _assert_identical(ref, out)
    plain = tmp_path / "other-seed"
    r = _run(_cmd(cfg, plain, 1, "checkpoint.resume=never", "train.max_steps=2", "train.seed=43"))  # dropout is live: another seed, another loss
    assert r.returncode == 0 and tiny.losses(plain)[1] != tiny.losses(ref)[1]
