"""A hard-dead rank (SIGKILL, OOM killer, a lost node) stops the ranks waiting for it in the rendezvous store within
the bound (`engine.collective_timeout_minutes`), naming it, instead of hanging them forever. The ranks are started
as plain processes with the launcher's variables, as `deepspeed` over pdsh or a static `torchrun` start each node's
ranks: no launcher notices one rank's death and ends the others."""

import os
import signal
import subprocess
import sys
import time

import pytest
import tiny
from helpers import REPO, free_port

BOUND_S = 12  # engine.collective_timeout_minutes = 0.2


def _ranks(cmd: list[str], env_extra: dict, world: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    return [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={
                **os.environ,
                **env_extra,
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(world)
    ]


def _wait_dead_then_survivor(procs: list[subprocess.Popen], dead: int, setup_s: float) -> tuple[float, str]:
    """Seconds from the death of rank `dead` to the exit of rank 0, and rank 0's stderr. A survivor still running
    a minute past the bound is the hang this guards against: killed, and the test fails."""
    try:
        procs[dead].wait(timeout=setup_s)
        died = time.monotonic()
        _, err = procs[0].communicate(timeout=BOUND_S + 60)
        return time.monotonic() - died, err
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


_WAITER = """
import os, sys, torch.distributed as tdist
from dist_ft import dist
tdist.init_process_group("gloo")
dist.start_heartbeat(float(sys.argv[1]))
dist.wait_for_all("everyone here")
if tdist.get_rank() == 1:
    os.kill(os.getpid(), 9)  # arrived at the first wait, dead before the second
try:
    dist.wait_for_all("rank 0 alone (an export)")
except Exception as e:
    print(f"error: {e}", file=sys.stderr)
    os._exit(2)
"""


def test_store_wait_names_a_dead_rank_within_the_bound():
    """The mechanism alone, in two bare processes: rank 1 dies between two waits; rank 0 stops in the second."""
    procs = _ranks([sys.executable, "-c", _WAITER, "3"], {})
    took, err = _wait_dead_then_survivor(procs, 1, 120)
    assert procs[0].returncode == 2, err[-3000:]
    assert "error: rank 1 stopped sending heartbeats" in err and "(rank 0 alone (an export))" in err, err[
        -3000:
    ]
    assert took < 3 + 10, took  # the bound, plus one look every 0.6 s, plus a loaded machine's slack


def test_rank_killed_in_a_save_stops_rank_0_naming_it(tmp_path, gpt2_dir):
    """2 CPU ranks; rank 1 is SIGKILLed inside the save of step 2 after writing its files, so rank 0 waits for its
    report in the store. Rank 0 exits non-zero within the bound with one error line naming rank 1, and no step-2
    checkpoint is published. (Before heartbeats, rank 0 waited forever.)"""
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dir,
        32,
        "max_steps: 3, micro_batch_size: 2, lr: 3.0e-3",
        "precision: fp32, zero_stage: 2, collective_timeout_minutes: 0.2",
        "checkpoint: {every_steps: 2}\n",
    )
    out = tmp_path / "out"
    procs = _ranks(
        [sys.executable, "launch/train.py", str(cfg), f"output.dir={out}"],
        {"DIST_FT_TEST_KILL_RANK_IN_SAVE": "2:1"},
    )
    took, err = _wait_dead_then_survivor(procs, 1, 400)
    assert procs[1].returncode == -signal.SIGKILL
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert procs[0].returncode != 0 and len(errors) == 1, err[-3000:]
    assert (
        errors[0].startswith("error: rank 1 stopped sending heartbeats") and "checkpoint step 2" in errors[0]
    ), errors
    assert took < BOUND_S + 25, took  # the bound, one look per 2.4 s, the exit, a loaded machine
    assert not (out / "checkpoints" / "step-2").exists()


class _Store:
    """The store calls `_Liveness` makes, in memory."""

    def __init__(self):
        self.kv = {}

    def check(self, keys):
        return all(k in self.kv for k in keys)

    def multi_get(self, keys):
        return [self.kv[k] for k in keys]

    def get(self, key):
        return self.kv[key]


@pytest.mark.unit
def test_liveness_blames_only_missing_ranks_with_a_stale_heartbeat(monkeypatch):
    """On the waiter's own clock: a rank whose counter stops is dead after the bound, unless it has arrived; a
    waiter that itself did not run for a while (suspended) measures afresh."""
    from dist_ft import rendezvous

    now = [100.0]
    monkeypatch.setattr(rendezvous.time, "monotonic", lambda: now[0])
    store, arrivals = _Store(), ["w/0", "w/1", "w/2"]
    store.kv.update({"w/0": b"x", "dist_ft/hb/0": b"1", "dist_ft/hb/1": b"1", "dist_ft/hb/2": b"1"})
    live = rendezvous._Liveness(3, bound=10.0, interval=2.0)

    def tick(seconds: float, beating=(0, 1)):
        now[0] += seconds
        for r in beating:
            store.kv[f"dist_ft/hb/{r}"] = str(int(store.kv[f"dist_ft/hb/{r}"]) + 1).encode()
        return live.dead(store, arrivals)

    assert tick(1.0) == []  # not looked at within the first interval
    assert tick(2.0) == []  # the first look, at 103 s: rank 2's counter is noted
    for _ in range(5):
        assert tick(2.0) == []  # rank 2 silent for 10 s: not past the bound yet
    assert tick(2.0) == [(2, 12.0)]
    store.kv["w/2"] = b"x"  # it arrived before it died: the wait can finish, nobody is blamed
    assert tick(2.0) == []
    del store.kv["w/2"]
    assert tick(60.0) == []  # the waiter was stopped for a minute: afresh, no verdict from its own gap
    assert [tick(2.0) for _ in range(6)] == [[]] * 5 + [[(2, 12.0)]]
