"""One run per output directory: `<dir>/.dist_ft.lock`, held by rank 0 from the start of a run to its end.

The lock file holds its owner (host, kernel boot id, pid namespace, pid, process start, time, SLURM job). It is
created with O_EXCL (atomic on local filesystems and NFSv3+, unlike `flock` across nodes) and its mtime is a
heartbeat. A lock is taken over only when its owner is provably gone:
- a requeued SLURM job takes over from an earlier incarnation of the same job;
- on the same machine *and* the same pid namespace (same host name, boot id and /proc/self/ns/pid), when the
  owner's pid is dead or now belongs to another process;
- anywhere else (another host, another container sharing the host name, another pid namespace, a rebooted
  machine) only the heartbeat's age decides: older than `output.lock_stale_minutes` by the filesystem's clock.
A holder that was suspended past that age (SIGSTOP, `scontrol suspend`) may have lost its lock: the heartbeat
re-reads the file and touches it only while it is still its own (through the descriptor it read), and `verify()`
runs before every checkpoint or export is published, so a run that lost its lock stops (`LockLost`, exit 4)
before writing over the run that took the directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UserError

LOCK = ".dist_ft.lock"
HEARTBEAT_S = 30.0
LOCK_FILES = (LOCK, f"{LOCK}.stale-*", f"{LOCK}.probe-*")  # every name the lock machinery writes


class LockLost(UserError):
    """Another run took this run's output.dir over (this one was suspended or cut off past the stale age)."""

    exit_code = 4


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: str  # the process's start time in clock ticks since boot (/proc): a reused pid differs
    started: float  # unix time
    job: str  # SLURM_JOB_ID, "" outside SLURM
    restart: int  # SLURM_RESTART_COUNT: a requeued job keeps its id and counts up
    boot_id: str = ""  # the kernel's boot id: pids of another boot (or machine) say nothing here
    pid_ns: str = ""  # the pid namespace (/proc/self/ns/pid): a container's pid 1 is not ours

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()) or "", time.time(), os.environ.get("SLURM_JOB_ID", ""),
                   int(os.environ.get("SLURM_RESTART_COUNT") or 0), _read("/proc/sys/kernel/random/boot_id"), _pid_ns())

    @classmethod
    def parse(cls, raw: bytes | str) -> "Owner | None":
        try:
            data = json.loads(raw)
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def same_pid_space(self, other: "Owner") -> bool:
        """Whether this owner's pid can be looked up in `other`'s /proc: same host name, boot and pid namespace."""
        return self.host == other.host and bool(self.boot_id) and self.boot_id == other.boot_id and self.pid_ns == other.pid_ns

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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
    if owner.same_pid_space(me):
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
        self.lost: str | None = None  # why the lock is no longer ours, once the heartbeat or verify() found out
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        for _ in range(8):
            try:
                self.out.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:  # (also when a simultaneous launch made it a moment ago)
                pass
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except FileNotFoundError:  # a simultaneous launch that failed removed the directory it had created
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
        if owner is None:  # torn (its writer died between create and write, or is writing now) or vanished meanwhile
            if age is None or age < 60:
                time.sleep(0.5)
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
        return Owner.parse(raw), max(0.0, _fs_now(self.out) - mtime)

    def _refresh(self) -> str | None:
        """Touch the lock if it is still ours, through the very descriptor it was read from (a lock renamed in its
        place meanwhile is never touched); returns why it is not ours, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return f"{self.path} was removed"
        except OSError:
            return None  # a filesystem hiccup is not a lost lock; the next beat retries
        try:
            owner = Owner.parse(os.read(fd, 1 << 16))
            if owner != self.owner:
                return f"it is now held by another run ({owner.describe() if owner else 'unreadable lock file'})"
            os.utime(fd)
            return None
        except OSError:
            return None
        finally:
            os.close(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            why = self._refresh()
            if why is not None:
                self.lost = why
                return

    def verify(self, before: str) -> None:
        """Raise `LockLost` unless the lock is still this run's (called right before `before` is published)."""
        self.lost = self.lost or self._refresh()
        if self.lost:
            self._stop.set()
            raise LockLost(f"output.dir '{self.out}': this run no longer holds its lock ({self.lost}; it was suspended or cut off "
                           f"for longer than output.lock_stale_minutes, and another run took the directory over); stopped before "
                           f"{before}, leaving that run's files alone. Check which run should own '{self.out}'")

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
