"""Files that are never half-written, and checks that files are what a manifest says.

Every writer of lasting state (checkpoints, token shards, exports, metrics, the run's config) goes
through here: write into a temporary name, fsync, rename over the final name, fsync the directory.
A crash at any point leaves either the old file/directory or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileInfo:
    bytes: int
    sha256: str | None = None  # None where only the size is recorded (checkpoints: hashing GBs costs minutes)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync persists the renames inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync every file and folder under `root` and `root` itself; with files=False only the folders (their
    entries)."""
    for p in sorted(Path(root).rglob("*")) + [Path(root)]:
        if files or p.is_dir():
            fsync(p)


def sync_written(root: Path, paths, hash_below: int = 1 << 20) -> dict[str, FileInfo]:
    """fsync files this process wrote under `root`, then the folders holding them (up to `root`), and describe
    them: {path relative to root: size, and sha256 for files smaller than `hash_below`}. On a filesystem
    shared by nodes only the writer's fsync puts its data on stable storage: another node's client may still
    cache it."""
    root, out, dirs = Path(root), {}, {Path(root)}
    for p in map(Path, paths):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        out[str(p.relative_to(root))] = FileInfo(size, sha256_file(p) if size < hash_below else None)
        dirs.update(d for d in p.parents if d.is_relative_to(root))
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync(d)
    return out


_collectors: list[list[Path]] = []


@contextmanager
def collect_written() -> Iterator[list[Path]]:
    """The files that writers inside the block announce with `wrote` (e.g. a library's writes seen through a
    wrapper): how a rank knows which files of a folder it shares with other ranks are its own."""
    got: list[Path] = []
    _collectors.append(got)
    try:
        yield got
    finally:
        _collectors.remove(got)


def wrote(path: Path | str) -> None:
    for got in _collectors:
        got.append(Path(path))


def write_synced(path: Path, data: bytes | str) -> FileInfo:
    """Write a new file in a folder that is published later (no tmp + rename of its own) and fsync it."""
    raw = data.encode() if isinstance(data, str) else data
    with Path(path).open("wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return FileInfo(len(raw), sha256_bytes(raw))


def write_atomic(path: Path, data: bytes | str) -> FileInfo:
    """Write `data` to `path` through `<path>.tmp` + fsync + rename + directory fsync; returns its size and
    sha256 (hashed in memory, not read back)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync(path.parent)
    return FileInfo(len(raw), sha256_bytes(raw))


def replace_file(tmp: Path, path: Path) -> None:
    """Publish a file written elsewhere (e.g. by a library) at `tmp`: fsync it, rename it over `path`."""
    fsync(tmp)
    Path(tmp).replace(path)
    fsync(Path(path).parent)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields an empty `<final>.tmp/` to fill; on normal exit it is fsynced and swapped in for `final`
    (an existing `final` is removed first), and the parent fsynced. On an exception the tmp dir stays for
    inspection and `final` is untouched; the next attempt starts it afresh."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path, sync_files: bool = True) -> None:
    """fsync a filled directory (sync_files=False: only its folders, where each writer fsynced its own files)
    and put it in place of `final` with no moment where neither exists: an existing `final` is swapped with it
    in one atomic exchange (Linux renameat2), then deleted; where the filesystem cannot exchange, the old one
    is renamed to `<final>.old` first (a crash in between leaves `final.old`, which `rundir` puts back)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp, sync_files)
    if not final.exists():
        tmp.rename(final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the old contents
    else:
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    fsync(final.parent)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where libc or the filesystem lacks it."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def file_sizes(root: Path) -> dict[str, int]:
    """{relative path: size} of every file under `root`."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def mismatch(path: Path, want: FileInfo, verify_sha: bool = True) -> str | None:
    """Why `path` is not the file `want` describes (missing, size, checksum), or None when it is."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != want.bytes:
        return f"{size} bytes, expected {want.bytes} (truncated or replaced)"
    if verify_sha and want.sha256 is not None and sha256_file(path) != want.sha256:
        return "checksum mismatch (corrupt)"
    return None


def seen_mismatch(path: Path, want: FileInfo, missing_grace_s: float = 30.0) -> str | None:
    """`mismatch` for a file another node may just have written: the size comes from an open descriptor
    (opening revalidates a network filesystem's cached attributes, close-to-open), and a file that seems
    missing is looked for again for `missing_grace_s` (a cached negative lookup on NFS lasts up to a
    minute)."""
    deadline = time.monotonic() + missing_grace_s
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                return "missing"
            time.sleep(1.0)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size != want.bytes:
        return f"{size} bytes, expected {want.bytes} (truncated or replaced)"
    if want.sha256 is not None and sha256_file(path) != want.sha256:
        return "checksum mismatch (changed or corrupt)"
    return None


def first_mismatch(root: Path, files: dict[str, FileInfo], verify_sha: bool = True) -> tuple[str, str] | None:
    """(relative path, why) of the first file under `root` that does not match `files`, or None."""
    for rel, want in files.items():
        why = mismatch(Path(root) / rel, want, verify_sha)
        if why is not None:
            return rel, why
    return None
