"""Atomic, validated, resumable checkpoints, and the policy for resuming from them.

Layout: <output.dir>/checkpoints/step-N/ holding the engine state (model, optimizer, ZeRO partitions, LR
scheduler) under `ds/` (written by the engine), our per-rank state `rank-R.pt` (`TrainState` + RNG
states), the resolved `config.yaml`, `manifest.json` (every file with its size, world size, ZeRO stage,
version) and a `COMPLETE` marker. Everything is written into `step-N.tmp/` and renamed only after the
manifest and marker are on disk (`fsio`), so a crash at any point leaves the previous checkpoint usable.
"Latest" is the newest folder whose marker and manifest check out, never a name guess.

`resume_plan` decides where a run continues from: rank 0 decides, every rank follows.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, dist, fsio, testhooks
from .config import Config, load_config
from .contracts import TrainState
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
# changing these between a checkpoint and its resume would break exactness, so it is refused
RESUME_MUST_MATCH = ("model", "data", "train.micro_batch_size", "train.grad_accum", "train.seed", "engine.zero_stage", "engine.precision")
DATA_MAY_CHANGE = ("cache_dir", "num_proc", "verify_shards")
RESHARD_MAY_CHANGE = ("train.micro_batch_size", "train.grad_accum", "engine.zero_stage")  # with the global batch kept
# changing these is applied over the checkpoint's values (DeepSpeed would restore the saved ones) and logged;
# the Adam moments and the step count are kept
RESUME_APPLIED = ("train.lr", "train.betas", "train.eps", "train.weight_decay", "train.warmup_steps", "train.schedule",
                  "train.min_lr_ratio", "train.max_grad_norm", "train.max_steps", "train.epochs")


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    zero_stage: int
    files: dict  # relative path -> size in bytes
    dist_ft_version: str = ""
    job: str = ""  # the SLURM job that wrote it ("" outside SLURM): a requeued job knows its own checkpoints
    base_sha256: str = ""  # parameter-efficient runs: the frozen base the adapter belongs to (not saved with it)


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None  # the checkpoint to continue from; None: a fresh start
    reshard: bool  # saved with another world size / ZeRO stage: loaded through a universal checkpoint
    replace: bool = False  # output.overwrite: the earlier run's outputs are moved aside (after validation)
    applied: tuple = ()  # (key, saved, now) of optimizer/schedule settings changed since the checkpoint
    skipped: tuple = ()  # (name, why) of damaged checkpoints newer than `path`, passed over

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


def validate(path: Path) -> Manifest | None:
    """The manifest of a complete checkpoint whose files all match it; None otherwise."""
    manifest, _ = _inspect(path)
    return manifest


def damage(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (naming the file), or None when it is one."""
    return _inspect(path)[1]


def _inspect(path: Path) -> tuple[Manifest | None, str | None]:
    if not (path / "COMPLETE").is_file():
        return None, "no COMPLETE marker: its save did not finish"
    try:
        manifest = Manifest(**json.loads((path / "manifest.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"manifest.json unreadable ({type(e).__name__})"
    bad = fsio.first_mismatch(path, {rel: fsio.FileInfo(size) for rel, size in manifest.files.items()})
    return (None, f"{bad[0]}: {bad[1]}") if bad else (manifest, None)


class Checkpointer:
    def __init__(self, out_dir: Path, keep: int, rank: int, world_size: int, keep_every: int = 0):
        self.root, self.keep, self.rank, self.world = out_dir / "checkpoints", keep, rank, world_size
        self.keep_every = keep_every
        self.base_sha256 = ""  # an adapter run's frozen base (set once the engine holds it): saved, and checked on load
        self.before_publish = lambda what: None  # rank 0: raises if the run may no longer publish (it lost output.dir's lock)

    def survey(self) -> list[tuple[int, Path, str | None]]:
        """(step, path, why it is damaged or None) of every checkpoint directory, complete or not, oldest first."""
        found = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))) if self.root.is_dir() else []
        return [(s, p, damage(p)) for s, p in found]

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every valid checkpoint, oldest first."""
        return [(s, p) for s, p, why in self.survey() if why is None]

    def save(self, engine, state: TrainState, config_yaml: str) -> Path:
        """All ranks call this. Returns the final path."""
        step = state.step
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.wait_for_all(f"checkpoint step {step}: folder")
        engine.save(tmp)
        torch.save({**state.to_dict(), "rng": rng_state()}, tmp / f"rank-{self.rank}.pt")
        dist.wait_for_all(f"checkpoint step {step}: every rank's state written")
        if self.rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            testhooks.pause_in_save(step)
            manifest = Manifest(step, self.world, engine.zero_stage, fsio.file_sizes(tmp), __version__,
                                os.environ.get("SLURM_JOB_ID", ""), self.base_sha256)
            (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1))
            (tmp / "COMPLETE").write_text("ok\n")
            self.before_publish(f"publishing checkpoint {final.name}")
            fsio.publish_dir(tmp, final)  # (a re-save of the same step, e.g. a signal right after a periodic save, replaces it)
            for st, old in self.complete()[: -self.keep]:  # only after the new one is complete
                if self.keep_every and st % self.keep_every == 0:
                    continue  # a milestone: kept for good
                shutil.rmtree(old, ignore_errors=True)
        dist.wait_for_all(f"checkpoint step {step}: rank 0 fsyncs and publishes it")  # however long a slow filesystem takes
        return final

    def universal(self, path: Path, engine) -> Path:
        """Convert a checkpoint to DeepSpeed's universal format next to it, once; all ranks call this."""
        out = self.root / f".universal-{path.name}"
        if self.rank == 0 and not (out / "COMPLETE").is_file():
            with fsio.atomic_dir(out) as tmp:
                engine.to_universal(path, tmp)
                (tmp / "COMPLETE").write_text("ok\n")
        dist.wait_for_all(f"rank 0 converts {path.name} to a universal checkpoint")
        return out

    def load(self, plan: ResumePlan, engine) -> TrainState:
        """Restore the engine and this rank's state (RNG streams included) from the planned checkpoint."""
        path = plan.path
        manifest = validate(path)
        if manifest is None:
            raise UserError(f"{path}: not a complete checkpoint (missing COMPLETE marker or files differ from manifest.json)")
        _same_base(path, manifest.base_sha256, self.base_sha256)  # every rank: each computed the base's fingerprint
        universal = self.universal(path, engine) if plan.reshard else None
        engine.load(universal or path)
        # data position is global (the same in every rank's file); RNG streams of new ranks start from the last old one
        state = torch.load(path / f"rank-{min(self.rank, manifest.world_size - 1)}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        if universal is not None:  # loaded everywhere: the conversion has served (the next save is in the new layout)
            dist.wait_for_all("universal checkpoint loaded")
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        return TrainState.from_dict(state)


def resume_plan(cfg: Config, ckpt: Checkpointer, world: int) -> ResumePlan:
    """Rank 0 decides which checkpoint to resume from (or none) and whether it must be resharded; every
    rank gets that decision (no rank lists the directory on its own: on a shared filesystem another node
    may see a stale listing). A refusal is raised on every rank with rank 0's message."""
    decision = None
    if ckpt.rank == 0:
        try:
            decision = (_decide(cfg, ckpt, world), None)
        except UserError as e:
            decision = (None, str(e))
    plan, error = dist.broadcast_object(decision)
    if error:
        raise UserError(error)
    return plan


def _decide(cfg: Config, ckpt: Checkpointer, world: int) -> ResumePlan:
    """Where this run starts. `output.overwrite`: a fresh run that replaces what the directory holds (only a
    requeued SLURM job continues its own checkpoints). Otherwise `checkpoint.resume` `auto` continues the
    newest complete checkpoint, `never` starts fresh in a directory without checkpoints, a path continues that
    checkpoint (outside output.dir only with checkpoint.trust_foreign: loading it unpickles its files)."""
    out, mode, overwrite = Path(cfg.output.dir), cfg.checkpoint.resume, cfg.output.overwrite
    if not overwrite and (out / "final").exists():
        raise UserError(f"output.dir '{out}' already holds a finished run (final/); choose another output.dir, "
                        "or set output.overwrite=true to replace it with a new run")
    if mode not in ("auto", "never"):
        path = Path(mode)
        inside = path.resolve().is_relative_to(out.resolve())
        if not inside and not cfg.checkpoint.trust_foreign:
            raise UserError(f"checkpoint.resume '{path}' is outside output.dir '{out}'; loading a checkpoint runs its pickled "
                            "files, so set checkpoint.trust_foreign=true if you trust where it came from")
        if inside and overwrite:
            raise UserError(f"checkpoint.resume '{path}' lies in output.dir, which output.overwrite=true replaces; "
                            "drop output.overwrite to continue that checkpoint")
        return _checked(cfg, path, world, replace=overwrite)
    survey = ckpt.survey()
    done = [(s, p) for s, p, why in survey if why is None]
    if overwrite:
        own = _requeued_own(done)
        return _checked(cfg, own, world, replace=False) if own else ResumePlan(None, False, replace=True)
    if mode == "never":
        if survey:
            raise UserError(f"output.dir '{out}' holds checkpoints of an earlier run; checkpoint.resume=never would mix two runs "
                            "there: set output.overwrite=true to replace it, or choose another output.dir")
        return ResumePlan(None, False)
    damaged = [(p.name, why) for s, p, why in survey if why is not None and s > (done[-1][0] if done else -1)]
    if damaged and not done:
        name, why = damaged[-1]
        raise UserError(f"output.dir '{out}' holds checkpoints but none is complete ({name}: {why}); starting over there "
                        "would mix two runs: set output.overwrite=true to replace them, or restore the missing files")
    return replace(_checked(cfg, done[-1][1], world, replace=False), skipped=tuple(damaged)) if done else ResumePlan(None, False)


def _same_base(path: Path, saved: str, now: str) -> None:
    """An adapter checkpoint holds no base weights: it continues only on the very base it was trained on; a DPO run only
    against the reference (its starting weights) it was trained against."""
    if saved != now:
        raise UserError(f"{path}: the base model's weights (sha256 {now[:12] or 'none'}) differ from those this "
                        f"checkpoint was trained on ({saved[:12] or 'none'}; an adapter's base, or a DPO run's reference); resume on "
                        "the same model.path and model.peft, or start over in a new output.dir")


def _requeued_own(done: list[tuple[int, Path]]) -> Path | None:
    """The newest checkpoint this very SLURM job wrote before it was requeued (so `output.overwrite` does not
    throw away the progress of a preempted job), or None."""
    job, restart = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not job or restart == 0 or not done:
        return None
    manifest = validate(done[-1][1])
    return done[-1][1] if manifest is not None and manifest.job == job else None


def _checked(cfg: Config, path: Path, world: int, replace: bool) -> ResumePlan:
    """The plan to continue `path`, after checking the saved config.
    Another world size or ZeRO stage is allowed when the global batch stays the same (resharded through
    DeepSpeed's universal checkpoint: the same global sample order, the optimizer state kept)."""
    manifest, why = _inspect(path)
    if manifest is None or not (path / "config.yaml").is_file():
        raise UserError(f"checkpoint.resume '{path}': no complete checkpoint there ({why or 'config.yaml missing'}; "
                        "expected <output.dir>/checkpoints/step-N)")
    saved, now = load_config(path / "config.yaml").model_dump(), cfg.model_dump()
    for tree in (saved, now):  # where shards are cached and how they are built or checked does not change the data
        for k in DATA_MAY_CHANGE:
            tree["data"].pop(k)

    def pick(tree, dotted):
        for k in dotted.split("."):
            tree = tree[k]
        return tree

    reshard = manifest.world_size != world or manifest.zero_stage != cfg.engine.zero_stage
    must = [k for k in RESUME_MUST_MATCH if not (reshard and k in RESHARD_MAY_CHANGE)]
    changed = [k for k in must if pick(saved, k) != pick(now, k)]
    if changed:
        raise UserError(f"{path}: config differs from the checkpoint in {', '.join(changed)}, which would break an exact resume; "
                        "restore those values, or set output.overwrite=true (or a new output.dir) to start over")
    if reshard:
        st, nt = saved["train"], now["train"]
        g_old, g_new = st["micro_batch_size"] * st["grad_accum"] * manifest.world_size, nt["micro_batch_size"] * nt["grad_accum"] * world
        if g_old != g_new:
            raise UserError(f"{path}: saved with {manifest.world_size} ranks (global batch {g_old}), this run has {world} ranks "
                            f"(global batch {g_new}); set train.micro_batch_size / train.grad_accum so micro x accum x world = {g_old}")
        if cfg.model.peft is not None:  # DeepSpeed's universal conversion expects every parameter in the checkpoint
            raise UserError(f"{path}: a parameter-efficient (model.peft) checkpoint resumes only on its own world size "
                            f"({manifest.world_size}) and engine.zero_stage ({manifest.zero_stage}); relaunch with those")
        if not {manifest.zero_stage, cfg.engine.zero_stage} <= {1, 2}:
            # ZeRO-3 <-> 1/2 fails inside DeepSpeed 0.19's loader; ZeRO-3 -> ZeRO-3 on a new world size loads but
            # does not continue the run exactly (tested), so neither is offered
            raise UserError(f"{path}: resharding to another world size / ZeRO stage works for ZeRO stages 1 and 2 "
                            f"(saved {manifest.zero_stage}, now {cfg.engine.zero_stage}); relaunch with the saved world size "
                            "and engine.zero_stage, or set checkpoint.resume=never to start over")
    applied = tuple((k, pick(saved, k), pick(now, k)) for k in RESUME_APPLIED if pick(saved, k) != pick(now, k))
    return ResumePlan(path, reshard, replace, applied)
