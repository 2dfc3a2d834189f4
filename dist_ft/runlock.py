"""One run per output directory: `<dir>/.dist_ft.lock`, held by rank 0 from the start of a run to its end; the
same lock (`FileLock`) guards a shard-cache entry while one process prepares it (the others wait for it).

The lock file holds its owner (host, kernel boot id, pid namespace, pid, process start, time, SLURM job). It
is created with O_EXCL (atomic on local filesystems and NFSv3+, unlike `flock` across nodes) and its mtime is
a heartbeat. A lock is taken over only when its owner is provably gone:
- a requeued SLURM job takes over from an earlier incarnation of the same job;
- on the same machine *and* the same pid namespace (same host name, boot id and /proc/self/ns/pid), when the
  owner's pid is dead or now belongs to another process;
- anywhere else (another host, another container sharing the host name, another pid namespace, a rebooted
  machine) only the heartbeat's age decides: older than `output.lock_stale_minutes` by the filesystem's clock.
A holder that was suspended past that age (SIGSTOP, `scontrol suspend`) may have lost its lock: the heartbeat
re-reads the file and touches it only while it is still its own (through the descriptor it read), and
`verify()` runs before every checkpoint or export is published, so a run that lost its lock stops (`LockLost`,
exit 4) before writing over the run that took the directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .dist import slurm_job
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
    def me(cls) -> Owner:
        return cls(
            socket.gethostname(),
            os.getpid(),
            _pid_start(os.getpid()) or "",
            time.time(),
            *slurm_job(),
            _read("/proc/sys/kernel/random/boot_id"),
            _pid_ns(),
        )

    @classmethod
    def parse(cls, raw: bytes | str) -> Owner | None:
        try:
            data = json.loads(raw)
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def same_pid_space(self, other: Owner) -> bool:
        """Whether this owner's pid can be looked up in `other`'s /proc: same host name, boot and pid
        namespace."""
        return (
            self.host == other.host
            and bool(self.boot_id)
            and self.boot_id == other.boot_id
            and self.pid_ns == other.pid_ns
        )

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}{job}, started {started}"


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
    # the fields after the command name: state, ..., starttime (field 22)
    after = stat.rsplit(")", 1)[1].split()
    # a zombie (dead, not yet reaped by its parent) is not running
    return None if after[0] in "ZX" else after[19]


def stale_reason(
    owner: Owner, age_s: float, me: Owner, stale_after_s: float, setting: str = "output.lock_stale_minutes"
) -> str | None:
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
        return f"no heartbeat for {age_s / 60:.1f} min (> {setting})"
    return None


class FileLock:
    """The lock file at `path`: O_EXCL, its owner inside, a heartbeat thread, and the takeover rules above.
    `setting` names what sets `stale_after_s` (for messages)."""

    _holder = "process"  # what holds it, in messages

    def __init__(self, path: Path, stale_after_s: float, setting: str):
        self.path, self.stale_after_s, self.setting = Path(path), stale_after_s, setting
        self.owner = Owner.me()
        self.note: str | None = None  # what a takeover of an abandoned lock found (the caller prints it)
        # why the lock is no longer ours, once the heartbeat or a check found out
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def attempt(self) -> Owner | bool:
        """One try: True once the lock is ours, the holder's Owner while a live holder has it, False to try
        again (a stale lock was just taken over, a torn one is being written, or the directory vanished
        meanwhile)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over_if_stale()
        except FileNotFoundError:
            # (e.g. a simultaneous launch that failed removed the directory it had created)
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.owner)))
            f.flush()
            os.fsync(f.fileno())
        self._beat = threading.Thread(target=self._heartbeat, name="dist_ft-lock-heartbeat", daemon=True)
        self._beat.start()
        return True

    def wait(self, what: str, log, max_wait_s: float, poll_s: float = 2.0, tell_s: float = 300.0) -> FileLock:
        """Take the lock, waiting while another live process holds it (polled every `poll_s`; said at once and
        every `tell_s`); a holder that dies is taken over by the rules above. Gives up after `max_wait_s` with
        a UserError."""
        t0, told = time.monotonic(), None
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            got = self.attempt()
            if got is True:
                return self
            waited = time.monotonic() - t0
            if isinstance(got, Owner) and (told is None or waited - told >= tell_s):
                log(
                    f"{what}: waiting for {got.describe()}, which holds {self.path} ({waited / 60:.0f} min "
                    "so far; the wait ends when it finishes, or if it dies, and gives up after "
                    f"{max_wait_s / 3600:g} h)"
                )
                told = waited
            if waited > max_wait_s:
                holder = got.describe() if isinstance(got, Owner) else "another process"
                raise UserError(
                    f"{what}: gave up after waiting {waited / 60:.0f} min for {holder}, which holds "
                    f"{self.path}; if that process is stuck, stop it (a dead holder's lock is taken over), "
                    "then retry"
                )
            time.sleep(poll_s)

    def _take_over_if_stale(self) -> Owner | bool:
        owner, age = self._read()
        why: str | None
        # torn (its writer died between create and write, or is writing now) or vanished meanwhile
        if owner is None:
            if age is None or age < 60:
                time.sleep(0.5)
                return False
            why = "unreadable lock file"
        else:
            assert age is not None  # (`_read` gives an owner only with the file's age)
            why = stale_reason(owner, age, self.owner, self.stale_after_s, self.setting)
            if why is None:
                return owner
        aside = self.path.with_name(f"{self.path.name}.stale-{self.owner.host}-{self.owner.pid}")
        try:
            os.rename(self.path, aside)  # only one of several takers wins this rename
        except FileNotFoundError:
            return False
        took, _ = self._read(aside)
        if took != owner:  # someone replaced the stale lock between our read and our rename: put theirs back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        gone = owner.describe() if owner else "unknown owner"
        self.note = f"took over the lock of a {self._holder} that is gone ({gone}): {why}"
        return False

    def _read(self, path: Path | None = None) -> tuple[Owner | None, float | None]:
        path = path or self.path
        try:
            raw, mtime = path.read_text(), path.stat().st_mtime
        except OSError:
            return None, None
        return Owner.parse(raw), max(0.0, _fs_now(self.path) - mtime)

    def _refresh(self) -> str | None:
        """Touch the lock if it is still ours, through the very descriptor it was read from (a lock renamed in
        its place meanwhile is never touched); returns why it is not ours, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return f"{self.path} was removed"
        except OSError:
            return None  # a filesystem hiccup is not a lost lock; the next beat retries
        try:
            owner = Owner.parse(os.read(fd, 1 << 16))
            if owner != self.owner:
                holder = owner.describe() if owner else "unreadable lock file"
                return f"it is now held by another {self._holder} ({holder})"
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

    def check(self) -> str | None:
        """Why the lock is no longer ours (then the heartbeat stops), or None while it is."""
        self.lost = self.lost or self._refresh()
        if self.lost:
            self._stop.set()
        return self.lost

    def release(self) -> None:
        """Drop the lock if it is still ours."""
        self._stop.set()
        owner, _ = self._read()
        if owner == self.owner:
            self.path.unlink(missing_ok=True)


class RunLock(FileLock):
    """Held by rank 0 from the start of a run to its end."""

    _holder = "run"

    def __init__(self, out: Path, stale_after_s: float):
        super().__init__(Path(out) / LOCK, stale_after_s, "output.lock_stale_minutes")
        self.out, self.created_dir = Path(out), False

    def acquire(self) -> RunLock:
        for _ in range(8):
            try:
                self.out.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:  # (also when a simultaneous launch made it a moment ago)
                pass
            got = self.attempt()
            if got is True:
                return self
            if isinstance(got, Owner):
                raise UserError(
                    f"output.dir '{self.out}' is in use by another run ({got.describe()}); wait for it to "
                    "end, stop it, or choose another output.dir (a dead run's lock is taken over "
                    "automatically)"
                )
        raise UserError(f"{self.path}: could not take the run lock (another run keeps taking it); retry")

    def verify(self, before: str) -> None:
        """Raise `LockLost` unless the lock is still this run's (called right before `before` is
        published)."""
        if self.check():
            raise LockLost(
                f"output.dir '{self.out}': this run no longer holds its lock ({self.lost}; it was suspended "
                "or cut off for longer than output.lock_stale_minutes, and another run took the directory "
                f"over); stopped before {before}, leaving that run's files alone. Check which run should own "
                f"'{self.out}'"
            )

    def release(self, remove_created_dir: bool = False) -> None:
        """Drop the lock if it is still ours; `remove_created_dir`: a run that failed before writing anything
        also removes the output directory it created (when nothing else is in it)."""
        super().release()
        if remove_created_dir and self.created_dir:
            try:
                self.out.rmdir()
            except OSError:
                pass


def _fs_now(lock: Path) -> float:
    """The filesystem's current time (its server's clock on NFS): the mtime of a file written now, next to
    `lock`."""
    probe = lock.with_name(f"{lock.name}.probe-{socket.gethostname()}-{os.getpid()}")
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)
