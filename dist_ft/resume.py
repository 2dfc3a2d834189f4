"""Where a run starts: the resume policy over the checkpoints `checkpoint.py` stores.

`resume_plan`: rank 0 decides (a fresh start, the newest complete checkpoint, a named one, or the run's own
checkpoint after a SLURM requeue under `output.overwrite`) and every rank follows. What a changed setting does
is declared on the config's fields (`on_resume`, config_section), read here by `settings()`: a checkpoint is
continued only when the settings that make a resume exact match (`must_match`); optimizer and schedule
settings that changed are applied over the saved ones (`applied`); another world size or ZeRO stage reshards
when the global batch stays the same (`reshard`). The plan also fixes the precision the run trains in
(`resolved`): `engine.precision` resolved for a fresh start, the checkpoint's recorded one for a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import dist
from . import precision as precision_
from .checkpoint import (
    Manifest,
    ResumePlan,
    foreign_refusal,
    inspect_checkpoint,
    outside,
    survey,
    validate,
)
from .config import APPLIED, FREE, MUST_MATCH, RESHARD, Config, load_config
from .errors import UserError


@dataclass(frozen=True)
class Setting:
    """One leaf setting of the config as resume sees it: `section.name`, its rule (config.py's
    `on_resume`)."""

    section: str
    name: str
    rule: str

    @property
    def key(self) -> str:  # as the user writes it, for messages
        return f"{self.section}.{self.name}"

    def of(self, cfg: Config) -> Any:
        return getattr(getattr(cfg, self.section), self.name)


@cache
def settings() -> tuple[Setting, ...]:
    """Every setting of `Config` with its resume rule: the field's own `on_resume`, else its section's."""
    out = []
    for section, f in Config.model_fields.items():
        model = f.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            out.append(
                Setting(section, name, str(extra.get("on_resume", getattr(model, "resume_default", FREE))))
            )
    return tuple(out)


def resume_plan(cfg: Config, rank: int, world: int) -> ResumePlan:
    """Rank 0 decides which checkpoint to resume from (or none) and whether it must be resharded; every
    rank gets that decision (no rank lists the directory on its own: on a shared filesystem another node
    may see a stale listing). A refusal is raised on every rank with rank 0's message."""
    decision: tuple[ResumePlan | None, str | None] | None = None
    if rank == 0:
        try:
            plan = _decide(cfg, world)
            if plan.path is None:  # a fresh start: resolved here, once, for every rank
                eng = cfg.engine
                chosen = precision_.resolve(eng.precision, eng.zero_stage, eng.offload_optimizer)
                plan = replace(plan, precision=chosen)
            decision = (plan, None)
        except UserError as e:
            decision = (None, str(e))
    plan, error = dist.broadcast_object(decision)
    if error:
        raise UserError(error)
    return plan


def _decide(cfg: Config, world: int) -> ResumePlan:
    """Where this run starts. `output.overwrite`: a fresh run that replaces what the directory holds (only a
    requeued SLURM job continues its own checkpoints). Otherwise `checkpoint.resume` `auto` continues the
    newest complete checkpoint, `never` starts fresh in a directory without checkpoints, a path continues that
    checkpoint (outside output.dir only with checkpoint.trust_foreign: loading it unpickles its files)."""
    out, mode, overwrite = Path(cfg.output.dir), cfg.checkpoint.resume, cfg.output.overwrite
    if not overwrite and (out / "final").exists():
        raise UserError(
            f"output.dir '{out}' already holds a finished run (final/); choose another output.dir, "
            "or set output.overwrite=true to replace it with a new run"
        )
    if mode not in ("auto", "never"):
        path = Path(mode)
        inside = path.resolve().is_relative_to(out.resolve())
        if not inside and not cfg.checkpoint.trust_foreign:
            raise UserError(
                f"checkpoint.resume '{path}' is outside output.dir '{out}'; loading a checkpoint runs its "
                "pickled files, so set checkpoint.trust_foreign=true if you trust where it came from"
            )
        if inside and overwrite:
            raise UserError(
                f"checkpoint.resume '{path}' lies in output.dir, which output.overwrite=true replaces; "
                "drop output.overwrite to continue that checkpoint"
            )
        return _checked(cfg, path, world, replace=overwrite)
    found = survey(out)
    done = [(s, p) for s, p, why in found if why is None]
    if overwrite:
        own = _requeued_own(done)
        return _checked(cfg, own, world, replace=False) if own else ResumePlan(None, False, replace=True)
    if mode == "never":
        if found:
            raise UserError(
                f"output.dir '{out}' holds checkpoints of an earlier run; checkpoint.resume=never would mix "
                "two runs there: set output.overwrite=true to replace it, or choose another output.dir"
            )
        return ResumePlan(None, False)
    damaged = [(p.name, why) for s, p, why in found if why is not None and s > (done[-1][0] if done else -1)]
    if damaged and not done:
        name, why = damaged[-1]
        raise UserError(
            f"output.dir '{out}' holds checkpoints but none is complete ({name}: {why}); starting over there "
            "would mix two runs: set output.overwrite=true to replace them, or restore the missing files"
        )
    return (
        replace(_checked(cfg, done[-1][1], world, replace=False), skipped=tuple(damaged))
        if done
        else ResumePlan(None, False)
    )


def _requeued_own(done: list[tuple[int, Path]]) -> Path | None:
    """The newest checkpoint this very SLURM job wrote before it was requeued (so `output.overwrite` does not
    throw away the progress of a preempted job), or None."""
    job, restart = dist.slurm_job()
    if not job or restart == 0 or not done:
        return None
    manifest = validate(done[-1][1])
    return done[-1][1] if manifest is not None and manifest.job == job else None


def _checked(cfg: Config, path: Path, world: int, replace: bool) -> ResumePlan:
    """The plan to continue `path`, after checking that it lies in output.dir (symlinks resolved: one that
    leads out is foreign, and needs checkpoint.trust_foreign) and checking the saved config; nothing of it is
    read before that. Another world size or ZeRO stage is allowed when the global batch stays the same
    (resharded through DeepSpeed's universal checkpoint: the same global sample order, the optimizer state
    kept)."""
    out = Path(cfg.output.dir)
    bad = outside(path, out)
    if bad is not None and not cfg.checkpoint.trust_foreign:
        raise UserError(foreign_refusal(path, bad, out))
    manifest, why = inspect_checkpoint(path)
    if manifest is None or not (path / "config.yaml").is_file():
        raise UserError(
            f"checkpoint.resume '{path}': no complete checkpoint there ({why or 'config.yaml missing'}; "
            "expected <output.dir>/checkpoints/step-N)"
        )
    saved = load_config(path / "config.yaml")
    reshard = manifest.world_size != world or manifest.zero_stage != cfg.engine.zero_stage
    must = {MUST_MATCH, RESHARD} if not reshard else {MUST_MATCH}
    changed = [s.key for s in settings() if s.rule in must and s.of(saved) != s.of(cfg)]
    if changed:
        raise UserError(
            f"{path}: config differs from the checkpoint in {', '.join(changed)}, which would break an exact "
            "resume; restore those values, or set output.overwrite=true (or a new output.dir) to start over"
        )
    if reshard:
        st, nt = saved.train, cfg.train
        g_old, g_new = (
            st.micro_batch_size * st.grad_accum * manifest.world_size,
            nt.micro_batch_size * nt.grad_accum * world,
        )
        if g_old != g_new:
            raise UserError(
                f"{path}: saved with {manifest.world_size} ranks (global batch {g_old}), this run has "
                f"{world} ranks (global batch {g_new}); set train.micro_batch_size / train.grad_accum so "
                f"micro x accum x world = {g_old}"
            )
        if cfg.engine.sequence_parallel > 1:
            raise UserError(
                f"{path}: a sequence-parallel checkpoint resumes only on its own world size "
                f"({manifest.world_size}) and engine.zero_stage ({manifest.zero_stage}); relaunch with those"
            )
        # DeepSpeed's universal conversion expects every parameter in the checkpoint
        if cfg.model.peft is not None:
            raise UserError(
                f"{path}: a parameter-efficient (model.peft) checkpoint resumes only on its own world size "
                f"({manifest.world_size}) and engine.zero_stage ({manifest.zero_stage}); relaunch with those"
            )
        if not {manifest.zero_stage, cfg.engine.zero_stage} <= {1, 2}:
            # ZeRO-3 <-> 1/2 fails inside DeepSpeed 0.19's loader; ZeRO-3 -> ZeRO-3 on a new world size loads
            # but does not continue the run exactly (tested), so neither is offered
            raise UserError(
                f"{path}: resharding to another world size / ZeRO stage works for ZeRO stages 1 and 2 "
                f"(saved {manifest.zero_stage}, now {cfg.engine.zero_stage}); relaunch with the saved world "
                "size and engine.zero_stage, or set checkpoint.resume=never to start over"
            )
    applied = tuple(
        (s.key, s.of(saved), s.of(cfg)) for s in settings() if s.rule == APPLIED and s.of(saved) != s.of(cfg)
    )
    precision = _continued_precision(path, manifest, saved, cfg)
    return ResumePlan(path, reshard, replace, applied, foreign=bad is not None, precision=precision)


def _continued_precision(path: Path, manifest: Manifest, saved: Config, cfg: Config) -> str:
    """A run continues in the precision its checkpoint was trained in (recorded in the manifest; before it
    was, what the saved config resolved to then): `auto` follows it, another explicit value is refused (the
    weights, masters and Adam states would change meaning mid-run)."""
    trained = manifest.precision or precision_.resolved_before_recorded(saved.engine.precision)
    asked = cfg.engine.precision
    if asked != "auto" and asked != trained:
        raise UserError(
            f"{path}: trained in {trained} precision, this run sets engine.precision: {asked}; a run's "
            f"precision cannot change on resume: set engine.precision to {trained} or auto (which continues "
            "the checkpoint's), or set output.overwrite=true (or a new output.dir) to start over"
        )
    # (fp16 on a machine without a GPU is refused here as for a fresh start)
    return precision_.resolve(trained)
