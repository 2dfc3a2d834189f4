"""Fault tolerance: bit-exact resume after SIGKILL, crash during save, signal -> save + exit 75."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tiny
import torch
from helpers import REPO, assert_identical_runs, run_cmd, train_cmd
from safetensors.torch import load_file

STEPS = 12


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, gpt2_dir):
    return tiny.run_config(
        tmp_path_factory.mktemp("ckpt"),
        gpt2_dir,
        96,
        f"max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2",
        "precision: fp32",
        "checkpoint: {every_steps: 3}\n",
    )


@pytest.fixture(scope="module")
def reference(cfg):
    refs = {}
    for ranks, stage in ((1, 0), (2, 2)):
        out = cfg.parent / f"ref-{ranks}"
        r = run_cmd(train_cmd(cfg, out, ranks, f"engine.zero_stage={stage}"))
        assert r.returncode == 0, r.stderr[-3000:]
        refs[ranks] = out
    return refs


# checkpoints every 3 steps: killed 1 step past one (4; 2 ranks: 10) and 2 steps past one (11; 2 ranks: 5)
@pytest.mark.parametrize("ranks,kill_at", [(1, 4), (1, 11), (2, 5), (2, 10)])
def test_resume_after_sigkill_is_bit_exact(cfg, reference, ranks, kill_at):
    out = cfg.parent / f"kill-{ranks}-{kill_at}"
    stage = "engine.zero_stage=0" if ranks == 1 else "engine.zero_stage=2"
    r = run_cmd(train_cmd(cfg, out, ranks, stage), {"DIST_FT_TEST_KILL_AT_STEP": str(kill_at)})
    assert r.returncode != 0 and not (out / "final").exists()
    r = run_cmd(train_cmd(cfg, out, ranks, stage))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{kill_at // 3 * 3}'}" in r.stdout
    assert_identical_runs(reference[ranks], out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-9"]  # keep: 2


def test_crash_during_save_keeps_previous_checkpoint(cfg, reference):
    out = cfg.parent / "crash-in-save"
    proc = subprocess.Popen(
        train_cmd(cfg, out, 1),
        cwd=REPO,
        env={**os.environ, "DIST_FT_TEST_PAUSE_IN_SAVE": "6"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = out / "checkpoints" / "step-6.tmp"
    deadline = time.time() + 300
    while not (partial / "config.yaml").exists():  # engine state written, manifest not yet
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-6").exists()
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-3" in r.stdout
    assert_identical_runs(reference[1], out)


def test_signal_saves_and_exits_75_then_resumes_exactly(cfg, tmp_path):
    n = 60
    ref = tmp_path / "ref"
    assert run_cmd(train_cmd(cfg, ref, 1, f"train.max_steps={n}", "checkpoint.every_steps=0")).returncode == 0
    out = tmp_path / "sig"
    proc = subprocess.Popen(
        train_cmd(cfg, out, 1, f"train.max_steps={n}", "checkpoint.every_steps=0"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
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
    r = run_cmd(train_cmd(cfg, out, 1, f"train.max_steps={n}", "checkpoint.every_steps=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical_runs(ref, out)


def test_resumed_job_continues_the_same_wandb_run_and_leaks_no_secret(cfg, reference):
    out = cfg.parent / "wandb-resume"
    secret = {"WANDB_API_KEY": "sk-dist-ft-test-" + "7" * 24, "HF_TOKEN": "hf_dist_ft_test_token_123456"}
    r = run_cmd(train_cmd(cfg, out, 1, "track.wandb=offline"), {"DIST_FT_TEST_KILL_AT_STEP": "7", **secret})
    assert r.returncode != 0
    r = run_cmd(train_cmd(cfg, out, 1, "track.wandb=offline"), secret)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = tiny.wandb_run_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1], ids  # one run, two parts
    assert_identical_runs(reference[1], out)  # tracking does not change training
    for f in out.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert all(v.encode() not in blob for v in secret.values()), f


def test_resume_refuses_incompatible_config_but_allows_more_steps(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "cont"
    shutil.copytree(reference[1], out)
    shutil.rmtree(out / "final")
    r = run_cmd(train_cmd(cfg, out, 1, "train.micro_batch_size=3"))
    assert r.returncode == 2 and "config differs from the checkpoint in train.micro_batch_size" in r.stderr
    r = run_cmd(train_cmd(cfg, out, 1, f"train.max_steps={STEPS + 3}"))
    assert r.returncode == 0 and "resumed from" in r.stdout and "step 12" in r.stdout
    assert len(tiny.losses(out)) == STEPS + 3


def test_corrupt_latest_checkpoint_falls_back(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(reference[1], out)
    shutil.rmtree(out / "final")
    victim = next((out / "checkpoints" / "step-12" / "ds").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: size no longer matches the manifest
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0 and f"resumed from {out / 'checkpoints' / 'step-9'}" in r.stdout
    assert (
        f"; skipped damaged step-12 (ds/{victim.relative_to(out / 'checkpoints' / 'step-12' / 'ds')}: 100 bytes, expected"
        in r.stdout
    )


def test_keep_every_holds_milestones_and_rotation_keeps_the_newest(cfg, tmp_path):
    out = tmp_path / "milestones"
    r = run_cmd(
        train_cmd(cfg, out, 1, "checkpoint.every_steps=2", "checkpoint.keep=2", "checkpoint.keep_every=4")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir()) == [4, 8, 10, 12]
    saves = [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "checkpoint_save_s" in x
    ]
    assert [s["step"] for s in saves] == [2, 4, 6, 8, 10, 12] and all(
        s["checkpoint_save_s"] > 0 for s in saves
    )


@pytest.mark.parametrize("stage_before,ranks_after,stage_after", [(2, 1, 2), (2, 2, 1), (1, 1, 2)])
def test_resume_on_another_world_size_or_zero_stage_keeps_the_run(
    cfg, reference, tmp_path, stage_before, ranks_after, stage_after
):
    """2 ranks die after step 7 (checkpoint 6); the job continues on `ranks_after` ranks with ZeRO
    `stage_after`, the same global batch (micro x world constant), through DeepSpeed's universal checkpoint.
    The rest of the run equals the uninterrupted 2-rank run up to reduction-order rounding."""
    out = tmp_path / "elastic"
    r = run_cmd(
        train_cmd(cfg, out, 2, f"engine.zero_stage={stage_before}"), {"DIST_FT_TEST_KILL_AT_STEP": "7"}
    )
    assert r.returncode != 0 and (out / "checkpoints" / "step-6").is_dir()
    micro = 2 * 2 // ranks_after
    r = run_cmd(
        train_cmd(
            cfg, out, ranks_after, f"engine.zero_stage={stage_after}", f"train.micro_batch_size={micro}"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"resumed from {out / 'checkpoints' / 'step-6'} (resharded to this world size / ZeRO stage): step 6"
        in r.stdout
    )
    ref, got = tiny.losses(reference[2]), tiny.losses(out)
    assert len(got) == STEPS and max(abs(a - b) for a, b in zip(ref[:6], got[:6], strict=False)) < 2e-5
    assert max(abs(a - b) for a, b in zip(ref, got, strict=False)) < 2e-5, (
        ref,
        got,
    )  # the same samples, the same optimizer state
    wa, wb = (
        load_file(reference[2] / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=0)


def test_reshard_refuses_a_changed_global_batch(cfg, reference, tmp_path):
    import shutil

    out = tmp_path / "elastic-bad"
    shutil.copytree(reference[2], out)
    shutil.rmtree(out / "final")
    # 1 rank x micro 2 = 2 rows, the checkpoint had 4
    r = run_cmd(train_cmd(cfg, out, 1, "engine.zero_stage=2"))
    assert r.returncode == 2
    assert "saved with 2 ranks (global batch 4), this run has 1 ranks (global batch 2)" in r.stderr
    assert "micro x accum x world = 4" in r.stderr
    # ZeRO-3 is not resharded (not exact): said up front
    r = run_cmd(train_cmd(cfg, out, 2, "engine.zero_stage=3"))
    assert (
        r.returncode == 2
        and "resharding to another world size / ZeRO stage works for ZeRO stages 1 and 2" in r.stderr
    )


def test_resume_with_dropout_is_bit_exact(tmp_path, gpt2_dropout_dir):
    """Dropout 0.1: the resumed run draws the same masks as the uninterrupted one only if every RNG state
    (Python, NumPy, torch CPU, and each rank's CUDA generator on GPUs) was saved and restored."""
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dropout_dir,
        48,
        "max_steps: 6, micro_batch_size: 2, lr: 3.0e-3",
        "precision: fp32",
        "checkpoint: {every_steps: 2}\n",
    )
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert run_cmd(train_cmd(cfg, ref, 1)).returncode == 0
    r = run_cmd(train_cmd(cfg, out, 1), {"DIST_FT_TEST_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0 and f"resumed from {out / 'checkpoints' / 'step-2'}" in r.stdout, r.stderr[
        -3000:
    ]
    assert_identical_runs(ref, out)
    plain = tmp_path / "other-seed"
    # dropout is live: another seed, another loss
    r = run_cmd(train_cmd(cfg, plain, 1, "checkpoint.resume=never", "train.max_steps=2", "train.seed=43"))
    assert r.returncode == 0 and tiny.losses(plain)[1] != tiny.losses(ref)[1]


# ---------------------------------------------------------------- symlinked checkpoints (#25): foreign, never deleted through


def _tree(root: Path) -> dict:
    """Every entry under `root` without following links: files by content and mtime, links by target."""
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_file() and p.name != ".dist_ft.lock":  # (the run lock exists only during a run)
                snap[rel] = (p.read_bytes(), p.stat().st_mtime_ns)
            elif p.is_dir():
                snap[rel] = "dir"
    return snap


class _Unpickled:
    """Creates `marker` when unpickled: DeepSpeed's loader (torch.load, weights_only=False) would run it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fake_checkpoint(path: Path, step: int, files: dict | None = None) -> Path:
    """A folder that `validate` takes for a complete checkpoint."""
    path.mkdir(parents=True)
    for rel, data in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    sizes = {rel: len(data) for rel, data in (files or {}).items()}
    (path / "manifest.json").write_text(
        json.dumps({"step": step, "world_size": 1, "zero_stage": 0, "files": sizes})
    )
    (path / "COMPLETE").write_text("ok\n")
    return path


class _FakeEngine:
    zero_stage = 0

    def save(self, tmp: Path) -> None:
        (tmp / "ds").mkdir()
        (tmp / "ds" / "state.bin").write_bytes(b"x" * 8)


@pytest.mark.unit
def test_symlinks_make_a_checkpoint_foreign(tmp_path):
    from dist_ft.checkpoint import outside

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    home = _fake_checkpoint(out / "checkpoints" / "step-1", 1, {"ds/a.pt": b"a", "rank-0.pt": b"r"})
    assert outside(home, out) is None
    away = _fake_checkpoint(elsewhere / "step-2", 2, {"rank-0.pt": b"r"})
    (out / "checkpoints" / "step-2").symlink_to(away)  # the step folder itself
    assert outside(out / "checkpoints" / "step-2", out) == out / "checkpoints" / "step-2"
    (home / "ds" / "b.pt").symlink_to(away / "rank-0.pt")  # one file inside an otherwise local checkpoint
    assert outside(home, out) == home / "ds" / "b.pt"
    (home / "ds" / "b.pt").unlink()
    (home / "ds" / "b.pt").symlink_to(home / "ds" / "a.pt")  # a link that stays inside is fine
    assert outside(home, out) is None
    (home / "loop").symlink_to(home / "loop")
    assert outside(home, out) == home / "loop"
    (home / "loop").unlink()
    linked_root = tmp_path / "run2"
    linked_root.mkdir()
    # a symlinked checkpoints/: every step in it is foreign
    (linked_root / "checkpoints").symlink_to(out / "checkpoints")
    assert (
        outside(linked_root / "checkpoints" / "step-1", linked_root) == linked_root / "checkpoints" / "step-1"
    )


@pytest.mark.unit
def test_rotation_never_deletes_through_a_symlink(tmp_path, capfd):
    from dist_ft.checkpoint import Checkpointer
    from dist_ft.contracts import TrainState

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    precious = _fake_checkpoint(elsewhere / "step-1", 1, {"rank-0.pt": b"keep me"})
    (elsewhere / "data").mkdir()
    (elsewhere / "data" / "weights.bin").write_bytes(b"mine")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-1").symlink_to(precious)
    local = _fake_checkpoint(out / "checkpoints" / "step-2", 2)
    (local / "ds").symlink_to(elsewhere / "data")  # a link inside a checkpoint of this run
    (out / "checkpoints" / "step-3.tmp").symlink_to(elsewhere / "data")  # a linked leftover tmp
    before = _tree(elsewhere)
    ckpt = Checkpointer(out, keep=1, rank=0, world_size=1)
    ckpt.save(_FakeEngine(), TrainState(3, {}), "x: 1\n")
    # the links went, the local step-2 too
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    assert _tree(elsewhere) == before  # nothing they pointed to was touched
    # a symlinked checkpoints/: its folders lie outside output.dir, so rotation leaves them (and says so once)
    out2, scratch = tmp_path / "run2", tmp_path / "scratch"
    _fake_checkpoint(scratch / "step-1", 1, {"rank-0.pt": b"r"})
    out2.mkdir()
    (out2 / "checkpoints").symlink_to(scratch)
    ckpt = Checkpointer(out2, keep=1, rank=0, world_size=1)
    ckpt.save(_FakeEngine(), TrainState(2, {}), "x: 1\n")
    ckpt.save(_FakeEngine(), TrainState(3, {}), "x: 1\n")
    assert sorted(p.name for p in scratch.iterdir()) == ["step-1", "step-2", "step-3"]
    notes = [
        line
        for line in capfd.readouterr().err.splitlines()
        if line.startswith("note: checkpoint.keep leaves")
    ]
    assert (
        len(notes) == 2 and "step-1" in notes[0] and "step-2" in notes[1] and "outside output.dir" in notes[0]
    )


def test_symlinked_step_is_refused_without_trust_and_rotated_as_a_link(cfg, tmp_path):
    """checkpoints/step-3 -> elsewhere/step-3 (a real, complete checkpoint of this config): `resume: auto` refuses it in
    one line before anything is unpickled (a planted pickle would leave a marker) and output.dir stays as it was; with
    checkpoint.trust_foreign it resumes from it, and keep=1 later removes the link, never what it points to."""
    out, away = tmp_path / "run", tmp_path / "elsewhere" / "step-3"
    r = run_cmd(train_cmd(cfg, out, 1, "train.max_steps=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(out / "final")
    away.parent.mkdir()
    shutil.move(out / "checkpoints" / "step-3", away)
    (out / "checkpoints" / "step-3").symlink_to(away)
    victim = next(away.rglob("*model_states.pt"))
    original, manifest = victim.read_bytes(), (away / "manifest.json").read_text()
    marker = tmp_path / "unpickled"
    torch.save({"module": _Unpickled(marker)}, victim)
    m = json.loads(manifest)
    # still "complete": it would be the one resumed
    m["files"][str(victim.relative_to(away))] = victim.stat().st_size
    (away / "manifest.json").write_text(json.dumps(m))
    before, before_away = _tree(out), _tree(away.parent)
    r = run_cmd(train_cmd(cfg, out, 1, "train.max_steps=6"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (
        f"checkpoint '{out / 'checkpoints' / 'step-3'}' is a symlink to {away}, outside output.dir"
        in errors[0]
    )
    assert "set checkpoint.trust_foreign=true if you trust where it came from" in errors[0]
    assert not marker.exists() and "resumed from" not in r.stdout
    assert _tree(out) == before and _tree(away.parent) == before_away
    victim.write_bytes(original)
    (away / "manifest.json").write_text(manifest)
    before_away = _tree(away.parent)
    r = run_cmd(
        train_cmd(cfg, out, 1, "train.max_steps=6", "checkpoint.trust_foreign=true", "checkpoint.keep=1")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-3'}" in r.stdout and "step 3" in r.stdout
    # the link rotated away as a link
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]
    assert _tree(away.parent) == before_away and len(tiny.losses(out)) == 6
