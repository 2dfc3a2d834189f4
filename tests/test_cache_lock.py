"""The shard-cache lock (`<out>.lock`, the run lock's O_EXCL + heartbeat lock) on a filesystem where `flock` does
nothing (many NFS/Lustre mounts): two prepares of one entry take turns, the second waits and reuses the shards; a
dead holder is taken over. The slow, shared filesystem is a sitecustomize the test puts on PYTHONPATH, never product
code."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from helpers import REPO, run_cli

from dist_ft.config import load_config
from dist_ft.data import shards
from dist_ft.errors import UserError
from dist_ft.runlock import FileLock

# Every process gets this: flock is a no-op, and every atomic rename into the cache entry first says so (a file
# `<name>.inside`) and then waits for the test's `go` (at most 120 s): the test decides when the builds overlap.
SITECUSTOMIZE = """
import fcntl, os, time
from pathlib import Path

fcntl.flock = lambda *a, **k: None  # as on a mount without (cluster-wide) flock
_replace, _gate = os.replace, Path(os.environ["LOCKTEST_DIR"])


def replace(src, dst, *a, **k):
    if os.environ["LOCKTEST_OUT"] in str(dst):
        (_gate / (os.environ["LOCKTEST_ME"] + ".inside")).touch()
        deadline = time.time() + 120
        while not (_gate / "go").exists() and time.time() < deadline:
            time.sleep(0.05)
    return _replace(src, dst, *a, **k)


os.replace = replace
"""


def _config(tmp: Path, model: Path) -> Path:
    data = tiny.write_jsonl(tmp / "train.jsonl", tiny.toy_chat(64))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\ndata:\n  train: {data}\n  max_seq_len: 128\n  shard_tokens: 400\n  val_fraction: 0.2\n"
        "train: {max_steps: 2, micro_batch_size: 2}\nengine: {precision: fp32}\ntrack: {wandb: disabled}\n"
    )
    return cfg


def _check_shards(out: Path, cfg: Path) -> list[str]:
    """Every shard matches the manifest (size and sha256); returns their checksums."""
    manifest = shards.read_manifest(out)
    for split in manifest.splits:
        shards.ShardSet(out, manifest, split, verify=True)
    assert load_config(cfg).data.val_fraction == 0.2 and set(manifest.splits) == {"train", "validation"}
    return [s.bin.sha256 + s.idx.sha256 for info in manifest.splits.values() for s in info.shards]


def _entry(cache: Path) -> Path:
    """The one entry `dist-ft prepare CONFIG` (no --out) wrote under DIST_FT_CACHE=cache; nothing else is left there."""
    held = sorted((cache / "shards").iterdir())
    assert len(held) == 1 and held[0].is_dir(), held  # no lock, stale, probe or partial file left
    return held[0]


def test_two_prepares_of_one_cache_entry_take_turns_without_flock(tmp_path, gpt2_dir):
    cfg, cache, gate = _config(tmp_path, gpt2_dir), tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    (gate / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(gate), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "DIST_FT_CACHE": str(cache),
        "LOCKTEST_DIR": str(gate),
        "LOCKTEST_OUT": str(cache / "shards"),
    }
    procs, logs = {}, {}

    def start(me: str) -> None:
        logs[me] = tmp_path / f"{me}.log"
        procs[me] = subprocess.Popen(
            [sys.executable, "-m", "dist_ft", "prepare", str(cfg)],
            cwd=REPO,
            stdout=logs[me].open("w"),
            stderr=subprocess.STDOUT,
            env={**env, "LOCKTEST_ME": me},
        )

    def until(cond, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not cond():
            assert time.time() < deadline, f"{what}: " + " | ".join(
                p.read_text()[-1500:] for p in logs.values()
            )
            time.sleep(0.1)

    try:
        start("a")
        until(
            lambda: (gate / "a.inside").exists() or procs["a"].poll() is not None, "a never started writing"
        )
        start("b")  # a is inside its build, held at its first rename
        until(
            lambda: (
                "waiting for" in logs["b"].read_text()
                or (gate / "b.inside").exists()
                or procs["b"].poll() is not None
            ),
            "b never reached the lock",
        )
        (gate / "go").touch()
        rc = {me: p.wait(300) for me, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    text = {me: p.read_text() for me, p in logs.items()}
    assert rc == {"a": 0, "b": 0}, text
    # b waited for a (naming it), then found a's finished shards: they were written once
    assert (
        f"pid {procs['a'].pid}" in text["b"] and "waiting for" in text["b"] and "nothing to do" in text["b"]
    ), text["b"]
    assert (
        "prepare train:" in text["a"]
        and "prepare train:" not in text["b"]
        and not (gate / "b.inside").exists()
    )
    sums = _check_shards(_entry(cache), cfg)
    assert len(sums) >= 3
    # the same shards as a prepare that had the directory to itself
    r = run_cli("prepare", str(cfg), "--out", str(tmp_path / "alone"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _check_shards(tmp_path / "alone", cfg) == sums


def test_a_killed_prepares_lock_is_taken_over_and_its_shards_resumed(tmp_path, gpt2_dir):
    cfg, cache = _config(tmp_path, gpt2_dir), tmp_path / "cache"
    r = run_cli("prepare", str(cfg), env={"DIST_FT_TEST_KILL_AFTER_SHARD": "2", "DIST_FT_CACHE": str(cache)})
    assert r.returncode != 0
    locks = list((cache / "shards").glob("*.lock"))
    # SIGKILLed: its lock stays behind
    assert len(locks) == 1 and not (cache / "shards" / locks[0].stem).exists()
    dead = json.loads(locks[0].read_text())
    r = run_cli("prepare", str(cfg), env={"DIST_FT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"took over the lock of a process that is gone (host {dead['host']}, pid {dead['pid']}" in r.stdout
    ), r.stdout
    assert (
        f"pid {dead['pid']} is not running" in r.stdout and "resuming after 2 complete shard(s)" in r.stdout
    )
    _check_shards(_entry(cache), cfg)


HOLD = (
    "import sys, time\nfrom dist_ft.runlock import FileLock\nFileLock(sys.argv[1], 300, 'x').wait('t', print, 10)\n"
    "print('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n"
)


def test_a_waiting_prepare_says_whom_it_waits_for_and_gives_up_at_its_bound(tmp_path):
    lock = tmp_path / "entry.lock"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), "60"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "held"
        said: list[str] = []
        t0 = time.time()
        with pytest.raises(
            UserError,
            match=rf"prepare x: gave up after waiting 0 min for host .*, pid {p.pid}.*, which holds "
            rf"{lock}; if that process is stuck, stop it",
        ):
            FileLock(lock, 300, "5 min").wait("prepare x", said.append, max_wait_s=1.0, poll_s=0.1)
        assert (
            time.time() - t0 < 10
            and len(said) == 1
            and "waiting for host" in said[0]
            and f"pid {p.pid}" in said[0]
        )
    finally:
        p.kill()
        p.wait()
    # a holder that ends lets the waiter in; a dead holder (same machine) is taken over at once
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), "1"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    got = FileLock(lock, 300, "5 min").wait("prepare x", print, max_wait_s=60, poll_s=0.1)
    # (it exited without releasing: a SIGKILL alike)
    assert got.note and f"pid {p.pid} is not running" in got.note
    got.release()
    assert not lock.exists()
    p.wait()
