"""Atomic, validated, resumable checkpoints: save, list, inspect, load.

Layout: <output.dir>/checkpoints/step-N/ holding the engine state (model, optimizer, ZeRO partitions, LR
scheduler) under `ds/` (written by the engine), our per-rank state `rank-R.pt` (`TrainState` + RNG states),
the resolved `config.yaml`, `manifest.json` (every file with its size and the small ones' sha256, world size,
ZeRO stage, precision, version) and a `COMPLETE` marker. Each rank fsyncs the files it wrote and reports
them; rank 0 builds the manifest from the reports after checking them on disk (`checkpoint_files`).
Everything is written into `step-N.tmp/` and renamed only after the manifest and marker are on disk
(`fsio`), so a crash at any point leaves the previous checkpoint usable.
"Latest" is the newest folder whose marker and manifest check out, never a name guess.

Storage only: `resume.py` decides where a run continues from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, checkpoint_files, dist, fsio
from .contracts import TrainState
from .errors import UserError
from .faults import NONE, Faults

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    zero_stage: int
    files: dict  # relative path -> size in bytes
    dist_ft_version: str = ""
    job: str = ""  # the SLURM job that wrote it ("" outside SLURM): a requeued job knows its own checkpoints
    # parameter-efficient runs: the frozen base the adapter belongs to (not saved with it)
    base_sha256: str = ""
    # relative path -> sha256 of the small files (rank states, config)
    sha256: dict = field(default_factory=dict)
    # what engine.precision resolved to ("" before it was recorded): a resume continues in it
    precision: str = ""


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None  # the checkpoint to continue from; None: a fresh start
    reshard: bool  # saved with another world size / ZeRO stage: loaded through a universal checkpoint
    replace: bool = False  # output.overwrite: the earlier run's outputs are moved aside (after validation)
    applied: tuple = ()  # (key, saved, now) of optimizer/schedule settings changed since the checkpoint
    skipped: tuple = ()  # (name, why) of damaged checkpoints newer than `path`, passed over
    # `path` (or a file in it) lies outside output.dir, accepted with checkpoint.trust_foreign
    foreign: bool = False
    precision: str = ""  # what the run trains in: engine.precision resolved, or the checkpoint's

    def describe_applied(self) -> str:
        return ", ".join(f"{k} {old} -> {new}" for k, old, new in self.applied)

    def describe_skipped(self) -> str:
        return "".join(f"; skipped damaged {name} ({why})" for name, why in self.skipped)


def seed_all(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) RNGs from one seed, at the start of a run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()  # legacy=True (the default): MT19937 as a tuple, never the dict form
    assert isinstance(np_state, tuple)
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this rank's own GPU (dropout masks are drawn there)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def validate(path: Path) -> Manifest | None:
    """The manifest of a complete checkpoint whose files all match it; None otherwise."""
    manifest, _ = inspect_checkpoint(path)
    return manifest


def damage(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (naming the file), or None when it is one."""
    return inspect_checkpoint(path)[1]


def outside(path: Path, out_dir: Path) -> Path | None:
    """`path`, or the first file or folder under it, whose real location (symlinks resolved) is not inside
    `out_dir`'s; None when the whole checkpoint lives in the run directory. A checkpoint reached through a
    symlink (step-N itself, a symlinked checkpoints/, or any file or folder in it) is foreign: loading it
    unpickles files from wherever the link points. Links are followed, each directory once (a loop ends
    there); a plain file in a folder that is inside is inside, so only folders and links are resolved."""
    root, seen, todo = Path(out_dir).resolve(), set(), [Path(path)]
    while todo:
        p = todo.pop()
        try:
            real = p.resolve()
            if not real.is_relative_to(root):
                return p
            if real in seen or not real.is_dir():
                continue
            seen.add(real)
            with os.scandir(p) as entries:
                todo += [
                    Path(e.path)
                    for e in sorted(entries, key=lambda e: e.name, reverse=True)
                    if e.is_symlink() or e.is_dir(follow_symlinks=False)
                ]
        except (OSError, RuntimeError):  # a symlink loop or an unreadable folder: nothing to vouch for
            return p
    return None


def foreign_refusal(path: Path, bad: Path, out_dir: Path) -> str:
    """One line: which link leads `path` out of output.dir, and what to do."""
    real: Path | str
    try:
        real = bad.resolve()
    except (OSError, RuntimeError):
        real = "a symlink loop or unreadable folder"
    if bad == path:
        where = (
            f"is a symlink to {real}" if path.is_symlink() else f"lies at {real} (through a symlinked folder)"
        )
    else:
        where = f"holds {bad.relative_to(path)}, which resolves to {real}"
    return (
        f"checkpoint '{path}' {where}, outside output.dir '{out_dir}'; loading a checkpoint runs its pickled "
        "files, so set checkpoint.trust_foreign=true if you trust where it came from, or replace the link "
        "with a copy of the checkpoint"
    )


def _remove(path: Path, out_dir: Path) -> bool:
    """Delete a checkpoint folder of this run, never through a symlink: a symlinked one loses only its link
    (what it points to is not ours), one whose real location is outside output.dir (a symlinked checkpoints/)
    is left (False). `rmtree` itself unlinks, never follows, the links inside a folder."""
    if path.is_symlink():
        path.unlink()
        return True
    if not path.exists():
        return True
    if not path.resolve().is_relative_to(Path(out_dir).resolve()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def inspect_checkpoint(path: Path) -> tuple[Manifest | None, str | None]:
    if not (path / "COMPLETE").is_file():
        return None, "no COMPLETE marker: its save did not finish"
    try:
        manifest = Manifest(**json.loads((path / "manifest.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"manifest.json unreadable ({type(e).__name__})"
    bad = fsio.first_mismatch(
        path, {rel: fsio.FileInfo(size, manifest.sha256.get(rel)) for rel, size in manifest.files.items()}
    )
    return (None, f"{bad[0]}: {bad[1]}") if bad else (manifest, None)


def survey(out_dir: Path) -> list[tuple[int, Path, str | None]]:
    """(step, path, why it is damaged or None) of every checkpoint directory of `out_dir`, complete or not,
    oldest first."""
    root = out_dir / "checkpoints"
    found = (
        sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
        if root.is_dir()
        else []
    )
    return [(s, p, damage(p)) for s, p in found]


class Checkpointer:
    def __init__(
        self,
        out_dir: Path,
        keep: int,
        rank: int,
        world_size: int,
        keep_every: int = 0,
        faults: Faults = NONE,
        *,
        base_sha256: str = "",
        precision: str = "",
        before_publish: Callable[[str], None] | None = None,
    ):
        """`base_sha256`: the weights this run must continue from ("" where any may;
        `reference.starting_point`), saved in every manifest and checked on load. `before_publish` (rank 0):
        raises if the run may no longer publish (it lost output.dir's lock). `precision`: what the run trains
        in, recorded in every manifest."""
        self.out, self.root, self.keep, self.rank, self.world = (
            out_dir,
            out_dir / "checkpoints",
            keep,
            rank,
            world_size,
        )
        self.keep_every, self.faults, self.base_sha256 = keep_every, faults, base_sha256
        self.precision = precision
        self.before_publish: Callable[[str], None] = before_publish or (lambda what: None)
        # old checkpoints outside output.dir that rotation could not delete (noted once each)
        self._left: set[Path] = set()

    def survey(self) -> list[tuple[int, Path, str | None]]:
        return survey(self.out)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every valid checkpoint, oldest first."""
        return [(s, p) for s, p, why in self.survey() if why is None]

    def save(self, engine, state: TrainState, config_yaml: str) -> Path:
        """All ranks call this. Returns the final path. Each rank fsyncs and reports the files it wrote
        (`checkpoint_files`); rank 0 checks every report on disk, writes the manifest from them, and
        publishes."""
        step = state.step
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        if self.rank == 0:
            # (never through a link)
            tmp.unlink() if tmp.is_symlink() else shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.wait_for_all(f"checkpoint step {step}: folder")
        with fsio.collect_written() as written:  # the engine announces each file this rank writes
            engine.save(tmp)
        torch.save({**state.to_dict(), "rng": rng_state()}, tmp / f"rank-{self.rank}.pt")
        mine = checkpoint_files.report(
            self.rank, tmp, [*dict.fromkeys(written), tmp / f"rank-{self.rank}.pt"]
        )
        self.faults.in_save(step, self.rank, tmp)
        reports = dist.gather_on_main(f"checkpoint step {step}: every rank's state written", mine)
        if self.rank == 0:
            assert reports is not None  # rank 0 (or a single process) gets every rank's report
            files, owner = checkpoint_files.merge(reports)
            files["config.yaml"] = fsio.write_synced(tmp / "config.yaml", config_yaml)
            self.faults.before_manifest(step)
            files.update(checkpoint_files.unreported(tmp, files))
            checkpoint_files.check(final.name, tmp, files, owner)
            manifest = Manifest(
                step,
                self.world,
                engine.zero_stage,
                {rel: fi.bytes for rel, fi in sorted(files.items())},
                __version__,
                dist.slurm_job()[0],
                self.base_sha256,
                {rel: fi.sha256 for rel, fi in sorted(files.items()) if fi.sha256},
                self.precision,
            )
            fsio.write_synced(tmp / "manifest.json", json.dumps(asdict(manifest), indent=1))
            fsio.write_synced(tmp / "COMPLETE", "ok\n")
            self.before_publish(f"publishing checkpoint {final.name}")
            # a linked (trusted foreign) step-N of the same step: the link gives way, its target is kept
            if final.is_symlink():
                final.unlink()
            # folders only: each rank fsynced its own files (a re-save of the same step, e.g. on a signal
            # right after a periodic save, replaces it)
            fsio.publish_dir(tmp, final, sync_files=False)
            for st, old in self.complete()[: -self.keep]:  # only after the new one is complete
                if self.keep_every and st % self.keep_every == 0:
                    continue  # a milestone: kept for good
                if not _remove(old, self.root.parent) and old not in self._left:
                    self._left.add(old)
                    print(
                        f"note: checkpoint.keep leaves {old} in place: it lies outside output.dir (at "
                        f"{old.resolve()}, through a symlink), and dist_ft deletes nothing there; remove it "
                        "yourself when it is no longer needed",
                        file=sys.stderr,
                        flush=True,
                    )
        # however long a slow filesystem takes
        dist.wait_for_all(f"checkpoint step {step}: rank 0 fsyncs and publishes it")
        return final

    def universal(self, path: Path, engine, trusted: bool = False) -> Path:
        """Convert a checkpoint to DeepSpeed's universal format next to it, once; all ranks call this. A
        leftover conversion that leads outside output.dir (a symlink) is not reused unless the checkpoint
        itself was trusted."""
        out = self.root / f".universal-{path.name}"
        if self.rank == 0 and (
            out.is_symlink() or (out.exists() and not trusted and outside(out, self.root.parent) is not None)
        ):
            _remove(out, self.root.parent)
        if self.rank == 0 and not (out / "COMPLETE").is_file():
            with fsio.atomic_dir(out) as tmp:
                engine.to_universal(path, tmp)
                (tmp / "COMPLETE").write_text("ok\n")
        dist.wait_for_all(f"rank 0 converts {path.name} to a universal checkpoint")
        return out

    def load(self, plan: ResumePlan, engine) -> TrainState:
        """Restore the engine and this rank's state (RNG streams included) from the planned checkpoint."""
        path = plan.path
        assert path is not None, "load() needs a plan with a checkpoint (a fresh start loads nothing)"
        bad = None if plan.foreign else outside(path, self.root.parent)
        if bad is not None:  # (decided inside output.dir: a link appeared since)
            raise UserError(foreign_refusal(path, bad, self.root.parent))
        manifest = validate(path)
        if manifest is None:
            raise UserError(
                f"{path}: not a complete checkpoint (missing COMPLETE marker or files differ from "
                "manifest.json)"
            )
        # every rank: each computed the base's fingerprint
        _same_base(path, manifest.base_sha256, self.base_sha256)
        universal = self.universal(path, engine, plan.foreign) if plan.reshard else None
        engine.load(universal or path)
        # data position is global (the same in every rank's file); RNG streams of new ranks start from the
        # last old one
        state = torch.load(path / f"rank-{min(self.rank, manifest.world_size - 1)}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        # loaded everywhere: the conversion has served (the next save is in the new layout)
        if universal is not None:
            dist.wait_for_all("universal checkpoint loaded")
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        return TrainState.from_dict(state)


def _same_base(path: Path, saved: str, now: str) -> None:
    """An adapter checkpoint holds no base weights: it continues only on the very base it was trained on; a
    DPO run only against the reference (its starting weights) it was trained against."""
    if saved != now:
        raise UserError(
            f"{path}: the base model's weights (sha256 {now[:12] or 'none'}) differ from those this "
            f"checkpoint was trained on ({saved[:12] or 'none'}; an adapter's base, or a DPO run's "
            "reference); resume on the same model.path and model.peft, or start over in a new output.dir"
        )
