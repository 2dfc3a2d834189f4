"""Where a run starts: the resume policy over the checkpoints `checkpoint.py` stores.

`resume_plan`: rank 0 decides (a fresh start, the newest complete checkpoint, a named one, or the run's own
checkpoint after a SLURM requeue under `output.overwrite`) and every rank follows. A checkpoint is continued only
when the settings that make a resume exact match (`RESUME_MUST_MATCH`); optimizer and schedule settings that changed
are applied over the saved ones (`RESUME_APPLIED`); another world size or ZeRO stage reshards when the global
batch stays the same.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import dist
from .checkpoint import Checkpointer, ResumePlan, foreign_refusal, inspect_checkpoint, outside, validate
from .config import Config, load_config
from .errors import UserError

# changing these between a checkpoint and its resume would break exactness, so it is refused
RESUME_MUST_MATCH = ("model", "data", "train.micro_batch_size", "train.grad_accum", "train.seed", "engine.zero_stage", "engine.precision")
DATA_MAY_CHANGE = ("cache_dir", "num_proc", "verify_shards")
RESHARD_MAY_CHANGE = ("train.micro_batch_size", "train.grad_accum", "engine.zero_stage")  # with the global batch kept
# changing these is applied over the checkpoint's values (DeepSpeed would restore the saved ones) and logged;
# the Adam moments and the step count are kept
RESUME_APPLIED = ("train.lr", "train.betas", "train.eps", "train.weight_decay", "train.warmup_steps", "train.schedule",
                  "train.min_lr_ratio", "train.max_grad_norm", "train.max_steps", "train.epochs")


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


def _requeued_own(done: list[tuple[int, Path]]) -> Path | None:
    """The newest checkpoint this very SLURM job wrote before it was requeued (so `output.overwrite` does not
    throw away the progress of a preempted job), or None."""
    job, restart = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not job or restart == 0 or not done:
        return None
    manifest = validate(done[-1][1])
    return done[-1][1] if manifest is not None and manifest.job == job else None


def _checked(cfg: Config, path: Path, world: int, replace: bool) -> ResumePlan:
    """The plan to continue `path`, after checking that it lies in output.dir (symlinks resolved: one that leads out is
    foreign, and needs checkpoint.trust_foreign) and checking the saved config; nothing of it is read before that.
    Another world size or ZeRO stage is allowed when the global batch stays the same (resharded through
    DeepSpeed's universal checkpoint: the same global sample order, the optimizer state kept)."""
    out = Path(cfg.output.dir)
    bad = outside(path, out)
    if bad is not None and not cfg.checkpoint.trust_foreign:
        raise UserError(foreign_refusal(path, bad, out))
    manifest, why = inspect_checkpoint(path)
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
    return ResumePlan(path, reshard, replace, applied, foreign=bad is not None)
