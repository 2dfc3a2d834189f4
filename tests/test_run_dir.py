"""What a run does with its output directory: overwrite means a fresh run, one run per directory (lock),
nothing written before validation, changed optimizer settings applied on resume, torn/orphaned files,
signals during setup, and the divergence guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tiny
import torch
from helpers import REPO, assert_identical_runs, run_cmd, train_cmd
from safetensors.torch import load_file

from dist_ft import fsio, rundir
from dist_ft.errors import UserError
from dist_ft.runlock import LOCK, LockLost, Owner, RunLock, stale_reason
from dist_ft.track import read_steps


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, gpt2_dir):
    return tiny.run_config(
        tmp_path_factory.mktemp("rundir"),
        gpt2_dir,
        32,
        "max_steps: 4, micro_batch_size: 2, lr: 3.0e-3",
        "precision: fp32",
        "checkpoint: {every_steps: 2}\n",
    )


@pytest.fixture(scope="module")
def reference(cfg):
    out = cfg.parent / "ref"
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed(cfg):
    """A run SIGKILLed right after step 2 (its checkpoint complete): a lock from a dead pid is left behind."""
    out = cfg.parent / "killed"
    r = run_cmd(train_cmd(cfg, out, 1), {"DIST_FT_TEST_KILL_AT_STEP": "2"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-2" / "COMPLETE").is_file()
    return out


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _snapshot(root):
    """Every file's bytes and mtime (a dead run's lock, taken over and released, is not the run's output)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def _lrs(out):
    return [s.lr for s in read_steps(out / "metrics.jsonl")]


def test_overwrite_starts_a_fresh_run_and_replaces_the_old_one(cfg, reference, tmp_path):
    out = _copy(reference, tmp_path / "again")
    (out / "notes.txt").write_text("mine")  # not a run output: left alone
    r = run_cmd(train_cmd(cfg, out, 1, "output.overwrite=true", "train.lr=6.0e-3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stdout and "output.overwrite: replaced the earlier run" in r.stdout
    fresh = tmp_path / "fresh"
    assert run_cmd(train_cmd(cfg, fresh, 1, "train.lr=6.0e-3")).returncode == 0
    # 4 new steps from scratch, the new lr from step 1, the new model exported
    assert_identical_runs(fresh, out)
    assert _lrs(out)[0] == 6.0e-3 and "lr: 0.006" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob(".replaced-*"))


def test_resume_never_over_checkpoints_is_refused(cfg, killed, tmp_path):
    out = _copy(killed, tmp_path / "never")
    before = _snapshot(out)
    r = run_cmd(train_cmd(cfg, out, 1, "checkpoint.resume=never"))
    assert (
        r.returncode == 2
        and "holds checkpoints of an earlier run" in r.stderr
        and "output.overwrite=true" in r.stderr
    )
    assert _snapshot(out) == before


def test_changed_optimizer_settings_are_applied_on_resume_and_logged(cfg, reference, killed, tmp_path):
    out = _copy(killed, tmp_path / "betas")
    r = run_cmd(train_cmd(cfg, out, 1, "train.betas=[0.5,0.6]", "train.lr=6.0e-3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "applied settings changed since the checkpoint: train.lr 0.003 -> 0.006, train.betas (0.9, 0.999) -> (0.5, 0.6)"
        in r.stdout
    )
    ref, got = tiny.losses(reference), tiny.losses(out)
    assert got[:3] == ref[:3] and got[3] != ref[3]  # steps 1-2 restored, step 3 taken with the new settings
    ref_lr, lr = _lrs(reference), _lrs(out)
    # the new peak, on the same schedule
    assert lr[2:] == pytest.approx([2 * x for x in ref_lr[2:]], rel=1e-12)


def test_betas_alone_change_the_continuation(cfg, reference, killed, tmp_path):
    """DeepSpeed restores the saved betas: without applying them the resumed run would equal the reference."""
    out = _copy(killed, tmp_path / "betas-only")
    r = run_cmd(train_cmd(cfg, out, 1, "train.betas=[0.5,0.6]"))
    assert r.returncode == 0 and "train.betas (0.9, 0.999) -> (0.5, 0.6)" in r.stdout
    assert tiny.losses(out)[3] != tiny.losses(reference)[3]


def test_torn_metrics_and_orphans_do_not_block_resume(cfg, reference, killed, tmp_path):
    out = _copy(killed, tmp_path / "torn")
    assert (out / LOCK).is_file()  # left by the SIGKILLed run: its pid is dead, so it is taken over
    with (out / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 3, "loss": 4.1' + b"\x00" * 64)  # a torn, NUL-filled last line
    for orphan in ("checkpoints/step-4.tmp", "checkpoints/.universal-step-2.tmp", "final.tmp"):
        (out / orphan).mkdir(parents=True)
        (out / orphan / "junk").write_text("x")
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "took over the lock of a run that is gone" in r.stdout and "pid" in r.stdout
    assert_identical_runs(reference, out)
    assert not [p for p in out.rglob("*.tmp")] and not (out / LOCK).exists()


def test_foreign_checkpoint_needs_trust(cfg, reference, killed, tmp_path):
    src = killed / "checkpoints" / "step-2"
    out = tmp_path / "elsewhere"
    r = run_cmd(train_cmd(cfg, out, 1, f"checkpoint.resume={src}"))
    assert (
        r.returncode == 2 and "outside output.dir" in r.stderr and "checkpoint.trust_foreign=true" in r.stderr
    )
    assert not out.exists()  # the run created the directory for its lock and removed it again
    r = run_cmd(train_cmd(cfg, out, 1, f"checkpoint.resume={src}", "checkpoint.trust_foreign=true"))
    assert r.returncode == 0 and f"resumed from {src}" in r.stdout
    # this directory's metrics start after the foreign step 2
    assert tiny.losses(out) == tiny.losses(reference)[2:]
    ref, got = (
        load_file(reference / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_bad_input_after_the_model_loads_writes_nothing(cfg, reference, tmp_path):
    out = _copy(reference, tmp_path / "keep")
    before = _snapshot(out)
    # the resume check fails after model, tokenizer and data loaded; config.yaml used to be written before all of them
    r = run_cmd(
        train_cmd(
            cfg,
            out,
            1,
            "output.overwrite=true",
            "checkpoint.resume=/nonexistent/step-9",
            "checkpoint.trust_foreign=true",
            "train.lr=0.5",
        )
    )
    assert r.returncode == 2 and "no complete checkpoint there" in r.stderr
    assert _snapshot(out) == before


def test_divergence_stops_without_saving_the_bad_state(cfg, tmp_path):
    out = tmp_path / "nan"
    r = run_cmd(train_cmd(cfg, out, 1, "train.lr=1e30", "train.max_steps=6", "checkpoint.every_steps=1"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert (
        r.returncode == 3
        and len(errors) == 1
        and "not finite" in errors[0]
        and "nonfinite_patience=0" in errors[0]
    ), r.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # the last finite state
    r = run_cmd(
        train_cmd(
            cfg,
            out,
            1,
            "train.lr=1e30",
            "train.max_steps=6",
            "checkpoint.every_steps=1",
            "train.nonfinite_patience=2",
        )
    )
    assert r.returncode == 3 and "for 3 consecutive step(s)" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]


def test_signal_during_setup_exits_75_and_a_second_run_is_locked_out(cfg, tmp_path):
    out = tmp_path / "early"
    env = {**os.environ, "DIST_FT_TEST_PAUSE_IN_SETUP": "120"}
    p = subprocess.Popen(
        train_cmd(cfg, out, 1),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / LOCK).is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = run_cmd(train_cmd(cfg, out, 1))
        assert (
            second.returncode == 2
            and f"'{out}' is in use by another run (host " in second.stderr
            and f"pid {p.pid}" in second.stderr
        )
        time.sleep(3)  # the first run is in its setup pause (model not loaded yet)
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 75, err[-2000:]
    assert not out.exists()  # nothing was written; the lock went and the directory it created with it


# ---- the lock's rules, in-process


def _owner(**kw):
    base = dict(host="here", pid=1, pid_start="1", started=0.0, job="", restart=0)
    return Owner(**{**base, **kw})


@pytest.mark.unit
def test_stale_lock_rules():
    me = Owner.me()
    here = dict(host=me.host, boot_id=me.boot_id, pid_ns=me.pid_ns)
    assert me.boot_id and me.pid_ns.startswith("pid:[")
    dead = _owner(**here, pid=2**22 + 7)  # beyond pid_max: never running
    assert "not running" in stale_reason(dead, 0, me, 300)
    alive = _owner(**here, pid=os.getpid(), pid_start=me.pid_start)
    assert stale_reason(alive, 10**6, me, 300) is None  # same host, pid alive: never stale, however old
    reused = _owner(**here, pid=os.getpid(), pid_start="0")
    assert "another process" in stale_reason(reused, 0, me, 300)
    # a container sharing the host name (another pid namespace), or another boot: its pid says nothing here
    for elsewhere in ({**here, "pid_ns": "pid:[1]"}, {**here, "boot_id": "another-boot"}, {"host": me.host}):
        assert stale_reason(_owner(**elsewhere, pid=2**22 + 7), 299, me, 300) is None
        assert "no heartbeat" in stale_reason(_owner(**elsewhere, pid=2**22 + 7), 301, me, 300)
    far = _owner(host="other-node")
    assert stale_reason(far, 299, me, 300) is None and "no heartbeat" in stale_reason(far, 301, me, 300)
    job = _owner(host="other-node", job="77", restart=0)
    requeued = Owner(me.host, me.pid, me.pid_start, me.started, "77", 1)
    assert "requeued" in stale_reason(job, 0, requeued, 300)
    # another job
    assert stale_reason(job, 0, Owner(me.host, me.pid, me.pid_start, me.started, "78", 1), 300) is None


@pytest.mark.unit
def test_lock_is_exclusive_and_taken_over_from_another_host_after_its_heartbeat_stops(tmp_path):
    a = RunLock(tmp_path / "run", stale_after_s=300).acquire()
    with pytest.raises(UserError, match="is in use by another run"):
        RunLock(tmp_path / "run", stale_after_s=300).acquire()
    a.release()
    assert not (tmp_path / "run" / LOCK).exists()
    lock = tmp_path / "run" / LOCK
    lock.write_text(json.dumps(_owner(host="other-node").__dict__))
    with pytest.raises(UserError, match="host other-node"):
        RunLock(tmp_path / "run", stale_after_s=300).acquire()
    old = time.time() - 400
    os.utime(lock, (old, old))  # no heartbeat for 400 s
    b = RunLock(tmp_path / "run", stale_after_s=300).acquire()
    assert "no heartbeat" in b.note and json.loads(lock.read_text())["pid"] == os.getpid()
    b.release()


@pytest.mark.unit
def test_final_is_swapped_without_a_gap(tmp_path, monkeypatch):
    # (an empty directory becomes a run directory: ours to repair)
    rundir.commit(tmp_path, "x: 1\n", replace=False)
    final = tmp_path / "final"
    final.mkdir()
    (final / "w").write_text("old")
    new = tmp_path / "final.tmp"
    new.mkdir()
    (new / "w").write_text("new")
    fsio.publish_dir(new, final)  # one atomic exchange: `final` always names a complete model
    assert (final / "w").read_text() == "new" and not new.exists()
    # where the filesystem cannot exchange: old -> final.old, new -> final; a crash between leaves final.old,
    # which the next run puts back before anything else
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    newer = tmp_path / "n2"
    newer.mkdir()
    (newer / "w").write_text("newer")
    fsio.publish_dir(newer, final)
    assert (final / "w").read_text() == "newer" and not (tmp_path / "final.old").exists()
    final.rename(tmp_path / "final.old")
    rundir.commit(tmp_path, "x: 1\n", replace=False)
    assert (final / "w").read_text() == "newer"


# ---- a lock that cannot be stolen from a live run

HOLD = "import sys, time\nfrom dist_ft.runlock import RunLock\nRunLock(sys.argv[1], 300).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"


def test_a_holder_in_another_pid_namespace_keeps_its_lock_while_its_heartbeat_is_fresh(tmp_path):
    """Its pid (1 in its own namespace) says nothing on this side: only the heartbeat's age decides."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    run = tmp_path / "run"
    p = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLD, str(run)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if p.stdout.readline().strip() != "held":
            pytest.skip(f"cannot make a pid namespace here: {p.stderr.read()[-300:]}")
        owner = json.loads((run / LOCK).read_text())
        assert owner["pid"] == 1 and owner["pid_ns"] != os.readlink("/proc/self/ns/pid")
        with pytest.raises(UserError, match="is in use by another run"):
            RunLock(run, stale_after_s=300).acquire()
        old = time.time() - 400
        os.utime(run / LOCK, (old, old))  # no heartbeat for 400 s: now it may be taken over
        b = RunLock(run, stale_after_s=300).acquire()
        assert "no heartbeat for 6.7 min" in b.note
        b.release()
    finally:
        p.kill()
        p.wait()


@pytest.mark.unit
def test_a_lock_taken_over_meanwhile_is_never_refreshed_and_stops_the_publish(tmp_path):
    a = RunLock(tmp_path / "run", stale_after_s=300).acquire()
    a.verify("publishing checkpoint step-1")  # still ours: nothing happens
    other = tmp_path / "run" / "other.lock"
    other.write_text(json.dumps(_owner(host="other-node", pid=4242).__dict__))
    os.utime(other, (1000.0, 1000.0))
    # another host's run took the directory over (this one was suspended)
    os.rename(other, tmp_path / "run" / LOCK)
    assert a._refresh() is not None  # the heartbeat sees it ...
    with pytest.raises(
        LockLost,
        match=r"no longer holds its lock \(it is now held by another run \(host other-node, pid 4242",
    ):
        a.verify("publishing checkpoint step-2")
    assert LockLost.exit_code == 4
    assert (tmp_path / "run" / LOCK).stat().st_mtime == 1000.0  # ... and never touches the other run's lock
    a.release()
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == 4242  # nor removes it


def test_a_suspended_run_that_lost_its_lock_stops_before_publishing(cfg, tmp_path):
    """SIGSTOP mid-save (as `scontrol suspend`), another host's run takes the lock, SIGCONT: exit 4, no step published."""
    out = tmp_path / "suspended"
    p = subprocess.Popen(
        train_cmd(cfg, out, 1, "checkpoint.every_steps=1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "DIST_FT_TEST_PAUSE_IN_SAVE": "2:6"},
    )
    try:
        deadline = time.time() + 300
        while (
            not (out / "checkpoints" / "step-2.tmp" / "config.yaml").is_file()
            and time.time() < deadline
            and p.poll() is None
        ):
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGSTOP)
        theirs = json.dumps(_owner(host="other-node", pid=4242).__dict__)
        (out / "theirs").write_text(theirs)
        os.rename(out / "theirs", out / LOCK)
        mtime = (out / LOCK).stat().st_mtime_ns
        os.killpg(p.pid, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert p.returncode == 4 and len(errors) == 1 and "no longer holds its lock" in errors[0], err[-3000:]
    assert "stopped before publishing checkpoint step-2" in errors[0] and "Traceback" not in err
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if not d.name.endswith(".tmp")) == [
        "step-1"
    ]
    assert (out / LOCK).read_text() == theirs and (out / LOCK).stat().st_mtime_ns == mtime
    assert not (out / "final").exists()


@pytest.mark.unit
def test_simultaneous_first_launches_never_traceback(tmp_path):
    """Six launches at once into a directory that does not exist yet, five times: one holds the lock, the others get
    the one-line refusal (or hold it after the first let go); none dies of a race."""
    try_once = (
        "import sys, time\nfrom dist_ft.errors import UserError\nfrom dist_ft.runlock import RunLock\ntry:\n"
        "    lock = RunLock(sys.argv[1], 300).acquire()\nexcept UserError as e:\n    print('refused:', e)\n    sys.exit(2)\n"
        "print('held')\ntime.sleep(0.3)\nlock.release(remove_created_dir=True)\n"
    )
    for round_ in range(5):
        run = tmp_path / f"r{round_}" / "run"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", try_once, str(run)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        assert all("Traceback" not in err and err.strip() == "" for _, _, err in results), results
        assert all(
            (rc, out.split(":")[0].strip()) in ((0, "held"), (2, "refused")) for rc, out, _ in results
        ), results
        assert any(rc == 0 for rc, _, _ in results)
        assert all("is in use by another run" in out for rc, out, _ in results if rc == 2), results
