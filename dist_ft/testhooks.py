"""Fault injection for the test suite, switched on by environment variables and inert otherwise.

- `DIST_FT_TEST_KILL_AT_STEP=N`: SIGKILL the job's whole process group right after optimizer step N
  (its checkpoint included) - a hard crash. Installed around the step loader, outside the loop.
- `DIST_FT_TEST_PAUSE_IN_SAVE=N[:S]`: rank 0 stalls in the save of step N after the engine state is written
  and before the manifest: for S seconds (honest slow work, e.g. a slow filesystem), or long enough for a
  test to kill the job mid-save.
- `DIST_FT_TEST_KILL_RANK_IN_SAVE=N:R`: rank R SIGKILLs itself (only itself: no launcher notices, as on another
  node) in the save of step N, after writing its files and before reporting them, so the others wait for it.
- `DIST_FT_TEST_CORRUPT_IN_SAVE=N:R`: rank R truncates its rank-R.pt in the save of step N after describing it
  for its report (a file that changed after its writer vouched for it, or a node that sees another version).
- `DIST_FT_TEST_KILL_AFTER_SHARD=N`: SIGKILL `prepare` right after it wrote shard number N.
- `DIST_FT_TEST_SLOW_TOKENS=S`: generation (inference.stream) sleeps S seconds after each token, so a test can hold a
  server's queue or disconnect mid-reply.
- `DIST_FT_TEST_PAUSE_IN_SETUP=S`: sleep S seconds in setup just before the model loads (for signals and
  locks that must work before the first step).
"""

from __future__ import annotations

import os
import signal
import time


class KillAfterStep:
    """Wraps a StepLoader: asked for the batch of step N+1, it kills the job instead (step N is complete)."""

    def __init__(self, loader, at: int, start: int):
        self._loader, self._at, self._done = loader, at, start

    def next(self):
        if self._done == self._at and os.environ.get("RANK", "0") == "0":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        self._done += 1
        return self._loader.next()

    def __getattr__(self, name):
        return getattr(self._loader, name)


def wrap_loader(loader, start: int):
    at = os.environ.get("DIST_FT_TEST_KILL_AT_STEP")
    return KillAfterStep(loader, int(at), start) if at else loader


def pause_in_save(step: int) -> None:
    step_s, _, seconds = os.environ.get("DIST_FT_TEST_PAUSE_IN_SAVE", "").partition(":")
    if step_s == str(step):
        time.sleep(float(seconds or 600))


def in_save(step: int, rank: int, folder) -> None:
    if os.environ.get("DIST_FT_TEST_KILL_RANK_IN_SAVE") == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("DIST_FT_TEST_CORRUPT_IN_SAVE") == f"{step}:{rank}":
        victim = folder / f"rank-{rank}.pt"
        victim.write_bytes(victim.read_bytes()[:100])


def kill_after_shard(shards_done: int) -> None:
    if os.environ.get("DIST_FT_TEST_KILL_AFTER_SHARD") == str(shards_done):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_in_setup() -> None:
    seconds = os.environ.get("DIST_FT_TEST_PAUSE_IN_SETUP")
    if seconds:
        time.sleep(float(seconds))


def slow_token() -> None:
    delay = float(os.environ.get("DIST_FT_TEST_SLOW_TOKENS") or 0)
    if delay:
        time.sleep(delay)
