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
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

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
    def __init__(self, out_dir: Path, keep: int, rank: int, world_size: int, keep_every: int = 0):
        self.root, self.keep, self.rank, self.world = out_dir / "checkpoints", keep, rank, world_size
        self.keep_every = keep_every

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
        # the marker lets DeepSpeed's ds_to_universal convert this checkpoint for another world size / stage
        engine.save_checkpoint(str(tmp), tag="ds", client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}},
                               save_latest=False)
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
            for st, old in self.complete()[: -self.keep]:  # only after the new one is complete
                if self.keep_every and st % self.keep_every == 0:
                    continue  # a milestone: kept for good
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def universal(self, path: Path) -> Path:
        """Convert a checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and optimizer
        states, independent of world size and ZeRO stage) next to it, once; all ranks call this."""
        out = self.root / f".universal-{path.name}"
        if self.rank == 0 and not (out / "COMPLETE").is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / "ds"),
                                "--output_folder", str(tmp / "ds"), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise UserError(f"{path}: converting to a universal checkpoint for the new world size / ZeRO stage failed: "
                                f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
            # DeepSpeed looks the common state up as mp_rank_00_* (ZeRO 1-2) or zero_pp_rank_0_mp_rank_00_* (ZeRO-3):
            # provide both names, so any stage can load what any stage saved
            names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
            have = [n for n in names if (tmp / "ds" / n).is_file()]
            if not have:
                raise UserError(f"{path}: the universal conversion wrote no model states file")
            for n in names:
                if n not in have:
                    shutil.copyfile(tmp / "ds" / have[0], tmp / "ds" / n)
            (tmp / "COMPLETE").write_text("ok\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        _barrier()
        return out

    def load(self, path: Path, engine, universal: Path | None = None) -> dict:
        """Restore engine + this rank's state from a validated checkpoint; returns our state dict.
        With `universal` (another world size / ZeRO stage), the engine state comes from that conversion."""
        manifest = validate(path)
        if manifest is None:
            raise UserError(f"{path}: not a complete checkpoint (missing COMPLETE marker or files differ from manifest.json)")
        load_path, _ = engine.load_checkpoint(str(universal or path), tag="ds")
        if load_path is None:
            raise UserError(f"{path}: DeepSpeed could not load the engine state")
        # data position is global (the same in every rank's file); RNG streams of new ranks start from the last old one
        state = torch.load(path / f"rank-{min(self.rank, manifest['world_size'] - 1)}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        if universal is not None:  # loaded everywhere: the conversion has served (the next save is in the new layout)
            _barrier()
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        return state


def _pause_for_tests(step: int) -> None:
    """Test hook: DIST_FT_TEST_PAUSE_IN_SAVE=N stalls the save of step N after the engine state is
    written (but before the manifest), so a test can kill the job mid-save."""
    if os.environ.get("DIST_FT_TEST_PAUSE_IN_SAVE") == str(step):
        import time

        time.sleep(600)
