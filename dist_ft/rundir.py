"""The run directory (`output.dir`): one run at a time, and what a new run does with what an earlier one left.

- `RunLock`: `<dir>/.dist_ft.lock` holds the owner (host, pid, process start, time, SLURM job). It is created
  with O_EXCL (atomic on local filesystems and NFSv3+, unlike `flock` across nodes) and its mtime is a
  heartbeat. A lock whose owner is gone is taken over: on the same host when the pid is dead (or reused),
  for a requeued SLURM job when the owner is an earlier incarnation of the same job, otherwise when the
  heartbeat is older than `output.lock_stale_minutes` as the filesystem's own clock tells (no clock skew).
- `commit`: runs after every check passed (model, tokenizer, data, resume point) and is the first write
  besides the lock: orphaned temporaries of crashed runs are removed, a replaced run (`output.overwrite`) is
  moved aside and deleted, and the resolved `config.yaml` is written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import fsio
from .errors import UserError

LOCK = ".dist_ft.lock"
HEARTBEAT_S = 30.0
# what a run writes (anything else in output.dir is the user's and never touched)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "loss.png", "config.yaml", "wandb")
RUN_OUTPUT_GLOBS = ("metrics-rank-*.jsonl", "rank-*.log")
# temporaries a crash can leave: never referenced by a complete run, so removed at start
ORPHAN_GLOBS = ("checkpoints/step-*.tmp", "checkpoints/.universal-*.tmp", "final.tmp", "final.old", ".replaced-*",
                "metrics.jsonl.tmp", "config.yaml.tmp", "loss.tmp.png", f"{LOCK}.stale-*", f"{LOCK}.probe-*")


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: str  # the process's start time in clock ticks since boot (/proc): a reused pid differs
    started: float  # unix time
    job: str  # SLURM_JOB_ID, "" outside SLURM
    restart: int  # SLURM_RESTART_COUNT: a requeued job keeps its id and counts up

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()) or "", time.time(),
                   os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT") or 0))

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def stale_reason(owner: Owner, age_s: float, me: Owner, stale_after_s: float) -> str | None:
    """Why `owner`'s lock (heartbeat `age_s` old) is abandoned, or None while it may still be running."""
    if owner.job and owner.job == me.job and owner.restart < me.restart:
        return f"SLURM job {owner.job} was requeued (restart {owner.restart} -> {me.restart})"
    if owner.host == me.host:
        start = _pid_start(owner.pid)
        if start is None:
            return f"pid {owner.pid} is not running"
        if owner.pid_start and start != owner.pid_start:
            return f"pid {owner.pid} now belongs to another process"
        return None
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s / 60:.1f} min (> output.lock_stale_minutes)"
    return None


class RunLock:
    """Held by rank 0 from the start of a run to its end."""

    def __init__(self, out: Path, stale_after_s: float):
        self.out, self.path, self.stale_after_s = Path(out), Path(out) / LOCK, stale_after_s
        self.owner, self.created_dir, self.note = Owner.me(), False, None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created_dir = True
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(self.owner)))
                f.flush()
                os.fsync(f.fileno())
            self._beat = threading.Thread(target=self._heartbeat, name="dist_ft-lock-heartbeat", daemon=True)
            self._beat.start()
            return self
        raise UserError(f"{self.path}: could not take the run lock (another run keeps taking it); retry")

    def _take_over_if_stale(self) -> None:
        owner, age = self._read()
        if owner is None:  # torn (its writer died between create and write) or vanished meanwhile
            if age is not None and age < 60:
                time.sleep(1.0)
                return
            why = "unreadable lock file"
        else:
            why = stale_reason(owner, age, self.owner, self.stale_after_s)
            if why is None:
                raise UserError(f"output.dir '{self.out}' is in use by another run ({owner.describe()}); wait for it to end, "
                                f"stop it, or choose another output.dir (a dead run's lock is taken over automatically)")
        aside = self.path.with_name(f"{LOCK}.stale-{self.owner.host}-{self.owner.pid}")
        try:
            os.rename(self.path, aside)  # only one of several takers wins this rename
        except FileNotFoundError:
            return
        took, _ = self._read(aside)
        if took != owner:  # someone replaced the stale lock between our read and our rename: put theirs back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        self.note = f"took over the lock of a run that is gone ({owner.describe() if owner else 'unknown owner'}): {why}"

    def _read(self, path: Path | None = None) -> tuple[Owner | None, float | None]:
        path = path or self.path
        try:
            raw, mtime = path.read_text(), path.stat().st_mtime
        except OSError:
            return None, None
        age = max(0.0, _fs_now(self.out) - mtime)
        try:
            return Owner(**json.loads(raw)), age
        except (ValueError, TypeError):
            return None, age

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self, remove_created_dir: bool = False) -> None:
        """Drop the lock if it is still ours; `remove_created_dir`: a run that failed before writing anything
        also removes the output directory it created (when nothing else is in it)."""
        self._stop.set()
        owner, _ = self._read()
        if owner == self.owner:
            self.path.unlink(missing_ok=True)
        if remove_created_dir and self.created_dir:
            try:
                self.out.rmdir()
            except OSError:
                pass


def _fs_now(directory: Path) -> float:
    """The filesystem's current time (its server's clock on NFS): the mtime of a file written now."""
    probe = Path(directory) / f"{LOCK}.probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def holds_run(out: Path) -> list[str]:
    """The run outputs present in `out` (what `output.overwrite` replaces)."""
    out = Path(out)
    found = [n for n in RUN_OUTPUTS if (out / n).exists()]
    return found + sorted(p.name for g in RUN_OUTPUT_GLOBS for p in out.glob(g))


def commit(out: Path, config_yaml: str, replace: bool) -> list[str]:
    """After validation: clean crash leftovers, move aside and delete a replaced run (`replace`), write
    config.yaml. Returns what was replaced."""
    out = Path(out)
    _restore_final(out)
    for pattern in ORPHAN_GLOBS:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    replaced = holds_run(out) if replace else []
    if replaced:
        aside = out / f".replaced-{int(time.time())}-{os.getpid()}"
        aside.mkdir()
        for name in replaced:  # renames within one directory: the old run is gone from view at once
            os.rename(out / name, aside / name)
        fsio.fsync(out)
        shutil.rmtree(aside)  # a crash here leaves .replaced-*, removed at the next start
        print(f"output.overwrite: replaced the earlier run in {out} ({', '.join(replaced)})", flush=True)
    fsio.write_atomic(out / "config.yaml", config_yaml)
    return replaced


def _restore_final(out: Path) -> None:
    """A crash between the two renames of a non-atomic `final/` swap leaves only `final.old`: put it back."""
    if (out / "final.old").is_dir() and not (out / "final").exists():
        os.rename(out / "final.old", out / "final")
