"""Fault injection for the test suite: one `Faults` value, built once from the environment by the command line
(`Faults.from_env`, the only reader of these variables) and passed down to the code it can break. Unset, every
method is a no-op; library callers get `NONE`.

- `DIST_FT_TEST_KILL_AT_STEP=N`: rank 0 SIGKILLs the job's whole process group right after optimizer step N
  (its evaluation and checkpoint included, before the next step's batch is taken) - a hard crash.
- `DIST_FT_TEST_PAUSE_IN_SAVE=N[:S]`: rank 0 stalls in the save of step N after the engine state is written
  and before the manifest: for S seconds (honest slow work, e.g. a slow filesystem), or long enough for a
  test to kill the job mid-save.
- `DIST_FT_TEST_KILL_RANK_IN_SAVE=N:R`: rank R SIGKILLs itself (only itself: no launcher notices, as on
  another node) in the save of step N, after writing its files and before reporting them, so the others wait
  for it.
- `DIST_FT_TEST_CORRUPT_IN_SAVE=N:R`: rank R truncates its rank-R.pt in the save of step N after describing it
  for its report (a file that changed after its writer vouched for it, or a node that sees another version).
- `DIST_FT_TEST_KILL_AFTER_SHARD=N`: SIGKILL `prepare` (or a run's on-the-fly tokenizing) right after it wrote
  shard number N.
- `DIST_FT_TEST_SLOW_TOKENS=S`: generation (inference.stream) sleeps S seconds after each token, so a test can
  hold a server's queue or disconnect mid-reply.
- `DIST_FT_TEST_PAUSE_IN_SETUP=S`: sleep S seconds in setup just before the model loads (for signals and
  locks that must work before the first step).

An empty variable is unset; a malformed one is refused (`UserError`) naming it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

PAUSE_S = 600.0  # DIST_FT_TEST_PAUSE_IN_SAVE without :S - long enough for a test to kill the job mid-save


@dataclass(frozen=True)
class Faults:
    kill_at_step: int | None = None
    pause_in_save: tuple[int, float] | None = None  # (step, seconds)
    kill_rank_in_save: tuple[int, int] | None = None  # (step, rank)
    corrupt_in_save: tuple[int, int] | None = None  # (step, rank)
    kill_after_shard: int | None = None
    slow_tokens: float | None = None  # seconds after each generated token
    pause_in_setup: float | None = None  # seconds

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        """The faults the DIST_FT_TEST_* variables of `environ` ask for (see the module docstring)."""

        def get(name: str, form: str, parse):
            value = environ.get(f"DIST_FT_TEST_{name}", "").strip()
            if not value:
                return None
            try:
                return parse(value)
            except ValueError:
                raise UserError(
                    f"DIST_FT_TEST_{name}={value!r}: expected {form} (a test fault-injection variable; "
                    "unset it to run normally)"
                ) from None

        def pair(kind):
            def parse(value: str):
                first, sep, second = value.partition(":")
                if not sep:
                    raise ValueError(value)
                return int(first), kind(second)

            return parse

        def seconds(value: str) -> float:
            s = float(value)
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(value)
            return s

        def pause(value: str) -> tuple[int, float]:
            step, _, s = value.partition(":")
            return int(step), seconds(s) if s else PAUSE_S

        return cls(
            kill_at_step=get("KILL_AT_STEP", "a step number N", int),
            pause_in_save=get("PAUSE_IN_SAVE", "STEP or STEP:SECONDS", pause),
            kill_rank_in_save=get("KILL_RANK_IN_SAVE", "STEP:RANK", pair(int)),
            corrupt_in_save=get("CORRUPT_IN_SAVE", "STEP:RANK", pair(int)),
            kill_after_shard=get("KILL_AFTER_SHARD", "a shard count N", int),
            slow_tokens=get("SLOW_TOKENS", "SECONDS (>= 0)", seconds),
            pause_in_setup=get("PAUSE_IN_SETUP", "SECONDS (>= 0)", seconds),
        )

    def after_step(self, step: int, rank: int) -> None:
        """Step `step` is complete, its evaluation and checkpoint included (the loop calls this before it
        takes the next step's batch, so never after the last one): rank 0 kills the job's whole process
        group."""
        if self.kill_at_step is not None and step == self.kill_at_step and rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def in_save(self, step: int, rank: int, folder: Path) -> None:
        """A rank of the save of `step` has written and described its files in `folder`, before reporting
        them."""
        if self.kill_rank_in_save == (step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.corrupt_in_save == (step, rank):
            victim = folder / f"rank-{rank}.pt"
            victim.write_bytes(victim.read_bytes()[:100])

    def before_manifest(self, step: int) -> None:
        """(rank 0) The save of `step` has every rank's files, not yet its manifest."""
        if self.pause_in_save is not None and self.pause_in_save[0] == step:
            time.sleep(self.pause_in_save[1])

    def after_shard(self, shards_done: int) -> None:
        if self.kill_after_shard is not None and shards_done == self.kill_after_shard:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_token(self) -> None:
        if self.slow_tokens:
            time.sleep(self.slow_tokens)

    def in_setup(self) -> None:
        """Setup is about to load the model."""
        if self.pause_in_setup is not None:
            time.sleep(self.pause_in_setup)


NONE = Faults()  # no faults: the default everywhere
