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
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from . import __version__, dist
from .config import Config, load_config
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
# changing these between a checkpoint and its resume would break exactness, so it is refused
RESUME_MUST_MATCH = ("model", "data", "train.micro_batch_size", "train.grad_accum", "train.seed", "engine.zero_stage", "engine.precision")
DATA_MAY_CHANGE = ("cache_dir", "num_proc", "verify_shards")
RESHARD_MAY_CHANGE = ("train.micro_batch_size", "train.grad_accum", "engine.zero_stage")  # with the global batch kept


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
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's own GPU (dropout masks are drawn there)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


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
        dist.wait_for_all(f"checkpoint step {step}: folder")
        # the marker lets DeepSpeed's ds_to_universal convert this checkpoint for another world size / stage
        engine.save_checkpoint(str(tmp), tag="ds", client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}},
                               save_latest=False)
        torch.save({**state, "rng": rng_state()}, tmp / f"rank-{self.rank}.pt")
        dist.wait_for_all(f"checkpoint step {step}: every rank's state written")
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
        dist.wait_for_all(f"checkpoint step {step}: rank 0 fsyncs and publishes it")  # however long a slow filesystem takes
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
        dist.wait_for_all(f"rank 0 converts {path.name} to a universal checkpoint")
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
            dist.wait_for_all("universal checkpoint loaded")
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        return state


def resume_point(cfg: Config, ckpt: Checkpointer, world: int) -> tuple[Path | None, bool]:
    """Rank 0 decides which checkpoint to resume from (or none) and whether it must be resharded; every
    rank gets that decision (no rank lists the directory on its own: on a shared filesystem another node
    may see a stale listing). A refusal is raised on every rank with rank 0's message."""
    decision = None
    if ckpt.rank == 0:
        try:
            path, reshard = _decide_resume(cfg, ckpt, world)
            decision = (str(path) if path else None, reshard, None)
        except UserError as e:
            decision = (None, False, str(e))
    path, reshard, error = dist.broadcast_object(decision)
    if error:
        raise UserError(error)
    return (Path(path) if path else None), reshard


def _decide_resume(cfg: Config, ckpt: Checkpointer, world: int) -> tuple[Path | None, bool]:
    """(checkpoint to resume from or None, whether it must be resharded), after checking the saved config.
    Another world size or ZeRO stage is allowed when the global batch stays the same (resharded through
    DeepSpeed's universal checkpoint: the same global sample order, the optimizer state kept)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None, False
    if mode == "auto":
        done = ckpt.complete()
        if not done:
            return None, False
        path = done[-1][1]
    else:
        path = Path(mode)
    manifest = validate(path)
    if manifest is None or not (path / "config.yaml").is_file():
        raise UserError(f"checkpoint.resume '{path}': no complete checkpoint there (expected <output.dir>/checkpoints/step-N)")
    saved, now = load_config(path / "config.yaml").model_dump(), cfg.model_dump()
    for tree in (saved, now):  # where shards are cached and how they are built or checked does not change the data
        for k in DATA_MAY_CHANGE:
            tree["data"].pop(k)

    def pick(tree, dotted):
        for k in dotted.split("."):
            tree = tree[k]
        return tree

    reshard = manifest["world_size"] != world or manifest["zero_stage"] != cfg.engine.zero_stage
    must = [k for k in RESUME_MUST_MATCH if not (reshard and k in RESHARD_MAY_CHANGE)]
    changed = [k for k in must if pick(saved, k) != pick(now, k)]
    if changed:
        raise UserError(f"{path}: config differs from the checkpoint in {', '.join(changed)}, which would break an exact resume; "
                        "restore those values, or set checkpoint.resume=never with a new output.dir")
    if reshard:
        st, nt = saved["train"], now["train"]
        g_old, g_new = st["micro_batch_size"] * st["grad_accum"] * manifest["world_size"], nt["micro_batch_size"] * nt["grad_accum"] * world
        if g_old != g_new:
            raise UserError(f"{path}: saved with {manifest['world_size']} ranks (global batch {g_old}), this run has {world} ranks "
                            f"(global batch {g_new}); set train.micro_batch_size / train.grad_accum so micro x accum x world = {g_old}")
        if not {manifest["zero_stage"], cfg.engine.zero_stage} <= {1, 2}:
            # ZeRO-3 <-> 1/2 fails inside DeepSpeed 0.19's loader; ZeRO-3 -> ZeRO-3 on a new world size loads but
            # does not continue the run exactly (tested), so neither is offered
            raise UserError(f"{path}: resharding to another world size / ZeRO stage works for ZeRO stages 1 and 2 "
                            f"(saved {manifest['zero_stage']}, now {cfg.engine.zero_stage}); relaunch with the saved world size "
                            "and engine.zero_stage, or set checkpoint.resume=never to start over")
    return path, reshard


def _pause_for_tests(step: int) -> None:
    """Test hook: DIST_FT_TEST_PAUSE_IN_SAVE=N stalls rank 0's part of the save of step N after the engine
    state is written (but before the manifest), so a test can kill the job mid-save; `N:S` stalls S seconds
    (honest slow work, e.g. a slow filesystem) and then carries on."""
    step_s, _, seconds = os.environ.get("DIST_FT_TEST_PAUSE_IN_SAVE", "").partition(":")
    if step_s == str(step):
        import time

        time.sleep(float(seconds or 600))
