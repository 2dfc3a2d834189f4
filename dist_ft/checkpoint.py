"""Atomic, validated, resumable checkpoints.

Layout: <output.dir>/checkpoints/step-N/ holding DeepSpeed's engine state (model, optimizer, ZeRO
partitions, LR scheduler) under `ds/`, our per-rank state `rank-R.pt` (RNG states, data position,
counters), the resolved `config.yaml`, `manifest.json` (every file with its size, world size, ZeRO
stage, version) and a `COMPLETE` marker. Everything is written into `step-N.tmp/` and renamed only
after the manifest and marker are on disk, so a crash at any point leaves the previous checkpoint
usable. "Latest" is the newest folder whose marker and manifest check out, never a name guess.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from . import __version__
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        _fsync(p)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])


def validate(path: Path) -> dict | None:
    """The manifest of a complete checkpoint whose files all match it; None otherwise."""
    try:
        if not (path / "COMPLETE").is_file():
            return None
        manifest = json.loads((path / "manifest.json").read_text())
        for rel, size in manifest["files"].items():
            if (path / rel).stat().st_size != size:
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


class Checkpointer:
    def __init__(self, out_dir: Path, keep: int, rank: int, world_size: int):
        self.root, self.keep, self.rank, self.world = out_dir / "checkpoints", keep, rank, world_size

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every valid checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]
        return sorted((s, p) for s, p in found if validate(p) is not None)

    def save(self, step: int, engine, state: dict, config_yaml: str) -> Path:
        """All ranks call this. Returns the final path."""
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag="ds", client_state={}, save_latest=False)
        torch.save({**state, "rng": rng_state()}, tmp / f"rank-{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            _pause_for_tests(step)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"step": step, "world_size": self.world, "zero_stage": engine.zero_optimization_stage(),
                        "dist_ft_version": __version__, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (tmp / "COMPLETE").write_text("ok\n")
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(self.root)  # persist the rename; the files themselves were synced above
            for _, old in self.complete()[: -self.keep]:  # only after the new one is complete
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, engine) -> dict:
        """Restore engine + this rank's state from a validated checkpoint; returns our state dict."""
        manifest = validate(path)
        if manifest is None:
            raise UserError(f"{path}: not a complete checkpoint (missing COMPLETE marker or files differ from manifest.json)")
        if manifest["world_size"] != self.world:
            raise UserError(f"{path}: saved with {manifest['world_size']} ranks, this run has {self.world}; "
                            "resuming on a different world size is not supported yet - relaunch with the same number of ranks")
        load_path, _ = engine.load_checkpoint(str(path), tag="ds")
        if load_path is None:
            raise UserError(f"{path}: DeepSpeed could not load the engine state")
        state = torch.load(path / f"rank-{self.rank}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        return state


def _pause_for_tests(step: int) -> None:
    """Test hook: DIST_FT_TEST_PAUSE_IN_SAVE=N stalls the save of step N after the engine state is
    written (but before the manifest), so a test can kill the job mid-save."""
    if os.environ.get("DIST_FT_TEST_PAUSE_IN_SAVE") == str(step):
        import time

        time.sleep(600)
