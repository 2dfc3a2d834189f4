"""Which files of a checkpoint each rank wrote, and rank 0's check of them before it writes the manifest.

On a filesystem shared by nodes only the writer's fsync puts a file on stable storage (another node's fsync
flushes nothing of it), and a directory walk on rank 0 may miss or mis-size a file another node just wrote
(NFS attribute and lookup caches). So each rank fsyncs what it wrote itself (its engine-state files, as the
engine announces them, and its rank-R.pt), reports them through the rendezvous store (relative name, size,
sha256 of files under 1 MiB), and rank 0 builds the manifest from the reports, checking each file on disk
first: a report that disagrees with what rank 0 sees stops the save, naming the rank and the file, before
`COMPLETE` exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import fsio
from .errors import UserError

# reported files smaller than this carry their sha256 (rank states, configs); GBs only their size
HASH_BELOW = 1 << 20


def report(rank: int, root: Path, paths) -> str:
    """fsync this rank's files under `root` (and their folders) and describe them for rank 0."""
    files = fsio.sync_written(root, paths, HASH_BELOW)
    return json.dumps({"rank": rank, "files": {rel: [fi.bytes, fi.sha256] for rel, fi in files.items()}})


def merge(reports: list[str]) -> tuple[dict[str, fsio.FileInfo], dict[str, int]]:
    """Every rank's reported files as one {relative path: FileInfo}, and which rank reported each."""
    files: dict[str, fsio.FileInfo] = {}
    owner: dict[str, int] = {}
    for raw in reports:
        r = json.loads(raw)
        for rel, (size, sha) in r["files"].items():
            fi = fsio.FileInfo(size, sha)
            if rel in files and files[rel] != fi:
                raise UserError(
                    f"ranks {owner[rel]} and {r['rank']} both wrote {rel} and describe it differently "
                    f"({files[rel].bytes} and {fi.bytes} bytes): two ranks wrote one file; the checkpoint is "
                    "not published"
                )
            files[rel], owner[rel] = fi, owner.get(rel, r["rank"])
    return files, owner


def unreported(root: Path, files: dict[str, fsio.FileInfo]) -> dict[str, fsio.FileInfo]:
    """Rank 0's own description of files under `root` that no rank reported (written by rank 0 outside the
    announced writes; none in a DeepSpeed save): fsynced and described by rank 0, as before reports
    existed."""
    extra = [Path(root) / rel for rel in fsio.file_sizes(root) if rel not in files]
    return fsio.sync_written(root, extra, HASH_BELOW) if extra else {}


def check(name: str, root: Path, files: dict[str, fsio.FileInfo], owner: dict[str, int]) -> None:
    """Raise, naming the rank and the file, unless every reported file is on disk as reported (size; sha256
    where given)."""
    for rel, want in files.items():
        why = fsio.seen_mismatch(Path(root) / rel, want)
        if why is not None:
            who = f"rank {owner.get(rel, 0)}"
            said = f"{want.bytes} bytes" + (f", sha256 {want.sha256[:12]}" if want.sha256 else "")
            raise UserError(
                f"checkpoint {name}: {who} wrote and fsynced {rel} ({said}) but rank 0 finds it {why}; the "
                "checkpoint is not published (the previous one stays the latest). Every node must see "
                "output.dir's filesystem alike (one shared mount, not node-local disks); check "
                f"{who}'s node and its mount, then resume"
            )
