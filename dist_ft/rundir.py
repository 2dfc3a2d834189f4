"""The run directory (`output.dir`): which directories a run may write into, and what a new run does with what
an earlier one left. dist_ft deletes only what it wrote and can prove it wrote.

- `MARKER` (`<dir>/.dist_ft-run.json`) is written by the first run in a directory that was new or empty (or
  held only our lock), with the run's identity and the names a run writes (`outputs`, `leftovers`). A
  directory with the marker is ours; one without it that holds anything else is refused: its files may be the
  user's or another tool's (`wandb/`, `checkpoints/`, `config.yaml` ...), however run-like their names.
- `check_target` refuses, before the lock or anything else is written, an output.dir that is `/`, the home
  directory, the current directory holding files that are not ours, a directory that is not ours and not
  empty, or one that contains the model, a data source, the prepared shards or the shard cache (overwrite
  would delete what the run reads).
- `commit` runs after every check passed (model, tokenizer, data, resume point) and is the first write besides
  the lock: in our directory only, and only names the marker lists: leftovers of crashed runs are removed, a
  replaced run (`output.overwrite`) is moved aside and deleted, the marker and the resolved `config.yaml` are
  written.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from . import dist, fsio
from .errors import UserError
from .runlock import LOCK_FILES, RunLock

MARKER = ".dist_ft-run.json"
# what a run writes (anything else in output.dir is the user's and never touched)
RUN_OUTPUTS = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "samples.jsonl",
    "loss.png",
    "config.yaml",
    "wandb",
    "metrics-rank-*.jsonl",
    "rank-*.log",
)
# temporaries a crash can leave: never referenced by a complete run, so removed at start
LEFTOVERS = (
    "checkpoints/step-*.tmp",
    "checkpoints/.universal-*.tmp",
    "final.tmp",
    "final.old",
    ".replaced-*",
    "metrics.jsonl.tmp",
    "config.yaml.tmp",
    "loss.tmp.png",
    f"{MARKER}.tmp",
    *LOCK_FILES[1:],
)


def read_marker(out: Path) -> dict | None:
    """The marker of a directory a dist_ft run owns, or None (absent, unreadable, or not ours)."""
    try:
        data = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(data, dict)
        and data.get("dist_ft_run") == 1
        and all(
            isinstance(data.get(k), list) and all(isinstance(n, str) for n in data[k])
            for k in ("outputs", "leftovers")
        )
    )
    return data if ok else None


def _ours_only(out: Path) -> list[str]:
    """The entries of `out` that are not ours (empty for a directory a run may claim: only our lock files in
    it)."""
    return sorted(
        p.name for p in out.iterdir() if not any(fnmatch.fnmatchcase(p.name, g) for g in LOCK_FILES)
    )


def _inside(path: Path, out: Path) -> bool:
    return path == out or path.is_relative_to(out)


def _read_paths(cfg) -> list[tuple[str, str]]:
    """(config key, local path) of everything a run reads that could lie in output.dir."""
    from .hub import resolve_path

    found = []
    try:
        found.append(("model.path", resolve_path(cfg.model.path)))
    except UserError:
        pass  # (preflight names a missing package)
    for role in ("train", "validation"):
        for src in cfg.data.sources(role):
            found.append((f"data.{role}.path", src.path))
    if cfg.data.prepared:
        found.append(("data.prepared", cfg.data.prepared))
    local = [(k, p) for k, p in found if "://" not in p and Path(p).expanduser().exists()]
    return local + [("data.cache_dir", str(cfg.data.cache_path()))]  # (created on first use)


def check_target(cfg) -> None:
    """Refuse an output.dir a run must not write into (one line naming it and what to do); nothing is
    written."""
    given = cfg.output.dir
    out = Path(given).expanduser().resolve()
    what = f"output.dir '{given}'"
    if out == Path("/") or out == Path.home().resolve():
        raise UserError(
            f"{what} is {'the root directory' if out == Path('/') else 'your home directory'}; a run writes "
            "checkpoints, logs and final/ there: give a directory of its own, e.g. output.dir=runs/my-run"
        )
    if out.exists() and not out.is_dir():
        raise UserError(
            f"{what} is a file, not a directory: give a directory for the run, e.g. output.dir=runs/my-run"
        )
    for key, path in _read_paths(cfg):
        if _inside(Path(path).expanduser().resolve(), out):
            raise UserError(
                f"{what} contains {key} '{path}', which this run reads (and output.overwrite would replace "
                "what lies in a run directory): write the run to another directory, e.g. "
                "output.dir=runs/next, or move the input out of it"
            )
    if not out.exists() or read_marker(out) is not None:
        return
    foreign = _ours_only(out)
    if not foreign:
        return
    shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
    if out == Path.cwd().resolve():
        raise UserError(
            f"{what} is the current directory, which holds files that are not a dist_ft run's ({shown}); "
            "give the run a directory of its own, e.g. output.dir=runs/my-run"
        )
    raise UserError(
        f"{what} is not empty and was not written by dist_ft (no {MARKER} in it; it holds {shown}); dist_ft "
        "writes only into a new or empty directory or its own run directory, and never deletes files it did "
        "not write: choose another output.dir"
    )


def claim(cfg, is_main: bool) -> RunLock | None:
    """Rank 0 checks output.dir may hold this run (`check_target`) and takes its run lock, before anything is
    written; every rank fails alike if it may not or the lock is taken."""
    lock, error = None, None
    if is_main:
        try:
            check_target(cfg)
            lock = RunLock(Path(cfg.output.dir), 60 * cfg.output.lock_stale_minutes).acquire()
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    if lock is not None and lock.note:
        print(lock.note, flush=True)
    return lock


def holds_run(out: Path, marker: dict) -> list[str]:
    """The run outputs the marker lists that are present in `out` (what `output.overwrite` replaces)."""
    return sorted({p.name for g in marker["outputs"] for p in Path(out).glob(g) if "/" not in g})


def _new_marker(out: Path) -> None:
    fsio.write_atomic(
        out / MARKER,
        json.dumps(
            {
                "dist_ft_run": 1,
                "id": uuid.uuid4().hex,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(),
                "outputs": list(RUN_OUTPUTS),
                "leftovers": list(LEFTOVERS),
            },
            indent=1,
        )
        + "\n",
    )


def commit(out: Path, config_yaml: str, replace: bool) -> list[str]:
    """After validation: in a directory `check_target` accepted, clean crash leftovers, move aside and delete
    a replaced run (`replace`), write the marker (a new run identity when replacing) and config.yaml. Returns
    what was replaced."""
    out = Path(out)
    marker = read_marker(out)
    if marker is None:
        foreign = _ours_only(out)
        if foreign:  # (check_target refused this before anything was loaded; files appeared since)
            raise UserError(
                f"output.dir '{out}': files that are not a dist_ft run's appeared in it during setup "
                f"({', '.join(foreign[:4])}); nothing was written: choose another output.dir"
            )
        _new_marker(out)
        marker = read_marker(out)
        assert marker is not None, f"{out / MARKER}: unreadable right after it was written"
    _restore_final(out)
    for pattern in marker["leftovers"]:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    replaced = holds_run(out, marker) if replace else []
    if replaced:
        aside = out / f".replaced-{int(time.time())}-{os.getpid()}"
        aside.mkdir()
        for name in replaced:  # renames within one directory: the old run is gone from view at once
            os.rename(out / name, aside / name)
        fsio.fsync(out)
        shutil.rmtree(aside)  # a crash here leaves .replaced-*, removed at the next start
        _new_marker(out)
        print(f"output.overwrite: replaced the earlier run in {out} ({', '.join(replaced)})", flush=True)
    fsio.write_atomic(out / "config.yaml", config_yaml)
    return replaced


def _restore_final(out: Path) -> None:
    """A crash between the two renames of a non-atomic `final/` swap leaves only `final.old`: put it back."""
    if (out / "final.old").is_dir() and not (out / "final").exists():
        os.rename(out / "final.old", out / "final")
