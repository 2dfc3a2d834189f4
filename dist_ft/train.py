"""The training loop. `setup` builds a `Run` (every check that can reject bad input happens there, before
anything is written); `train_step` runs one optimizer step and returns what it measured; `run` is the loop:
step -> log -> eval -> checkpoint, then export. The task (`tasks/`) decides what a batch's loss is and the
engine (`engine.py`) how it is computed on the ranks; neither is branched on here."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import dist, inference, perf, rundir, tasks
from . import setup as phases
from .checkpoint import Checkpointer, ResumePlan
from .config import Config, dump_config
from .contracts import ModelStates, StepMetrics, TrainState
from .data import dataset, mixture
from .data.loader import Step, StepLoader
from .engine import Engine, init_distributed
from .errors import PREEMPTED_MARK, Preempted
from .evaluate import add_sums, validation
from .export import write_final
from .faults import NONE, Faults
from .resume import resume_plan
from .runlock import LockLost, RunLock
from .stops import DivergenceGuard, Signals
from .track import Tracker, truncate_metrics

EXIT_PREEMPTED = 75  # saved on a signal; rerun (or requeue) the same command to continue


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: Config
    env: dist.DistEnv
    task: tasks.Task
    tok: object
    prep: dataset.Prepared
    engine: Engine
    ckpt: Checkpointer
    tracker: Tracker
    loader: StepLoader
    out: Path
    start: int  # optimizer steps already done (resumed)
    total_steps: int
    flops: perf.FlopCount  # executed FLOPs of a step (per_token of a batch)
    peak_flops: float | None
    formula: dict  # the ZeRO model-state formula for this rank, to set against what the engine measures
    signals: Signals  # received ones are agreed on by the ranks at the next step boundary
    guard: DivergenceGuard
    last_save: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Agreed:
    """What every rank decided together at the end of a step (one collective with the loss)."""

    stop: bool  # a rank got a preemption signal: save and exit 75
    save_due: bool  # checkpoint.every_minutes elapsed on some rank


def run(cfg: Config, faults: Faults = NONE) -> Path:
    signals = Signals(cfg.checkpoint.signals)  # from the first second: a signal during setup still exits 75
    env = lock = r = None
    try:
        env = init_distributed(cfg.engine.dist_backend, cfg.engine.collective_timeout_minutes)
        lock = rundir.claim(cfg, env.is_main)
        return _loop(r := setup(cfg, env, signals, lock, faults), faults)
    except Exception as e:
        if isinstance(e, Preempted) or (signals.received and r is None):
            dist.report_failure(f"{PREEMPTED_MARK}{e}")  # ranks waiting on this one exit 75 too
            print(
                f"stopped by a signal during setup ({e}); nothing to save: exit {EXIT_PREEMPTED} - "
                "run the same command to start",
                flush=True,
            )
            _exit_preempted(env is None or env.is_main)
        dist.report_failure(str(e))  # ranks waiting on this one stop instead of waiting forever
        raise
    finally:
        if lock is not None:
            # a run that wrote nothing leaves no empty directory behind
            lock.release(remove_created_dir=r is None)


def _loop(r: Run, faults: Faults = NONE) -> Path:
    t = r.cfg.train
    for step in range(r.start + 1, r.total_steps + 1):
        # step - 1 is complete, its eval and checkpoint included (a test may kill here)
        faults.after_step(step - 1, r.env.rank)
        batch = r.loader.next()  # collated on a background thread while the previous step ran
        metrics, agreed = train_step(r, batch, step)
        r.tracker.log_step(step, metrics)
        r.guard.check(step, metrics)  # a non-finite run stops here (exit 3), before anything saves its state
        if r.prep.val and ((t.eval_every and step % t.eval_every == 0) or step == r.total_steps):
            r.tracker.log(step, validation(r.engine, r.task, r.prep, r.cfg, r.env))
        if agreed.stop:
            if r.guard.healthy:
                save(r, step, batch.data_state)
            rerun = " without output.overwrite" if r.cfg.output.overwrite else ""
            r.tracker.info(
                f"stopped by signal after step {step}; exit {EXIT_PREEMPTED} - "
                f"run the same command{rerun} to resume"
            )
            close(r, EXIT_PREEMPTED)
            _exit_preempted(r.env.is_main)
        every = r.cfg.checkpoint.every_steps
        if r.guard.healthy and (step == r.total_steps or agreed.save_due or (every and step % every == 0)):
            save(r, step, batch.data_state)
    export(r)
    close(r)
    return r.out


def train_step(r: Run, batch: Step, step: int) -> tuple[StepMetrics, Agreed]:
    """Optimizer step `step` over this rank's `grad_accum` micro-batches; returns what it measured (summed
    over ranks)."""
    t0, engine, lr = time.perf_counter(), r.engine, r.engine.lr
    micro = batch.batches
    if r.task.rollout is not None:  # an online task's samples, from the model as it is now
        micro = r.task.rollout(engine, micro)
        r.tracker.samples(step, [row for b in micro for row in b.extra.get("samples", ())])
    n_loss, n_tokens, n_pos = dist.all_sum(
        sum(b.n_loss for b in micro), sum(b.n_tokens for b in micro), sum(b.n_positions for b in micro)
    )
    # DeepSpeed averages gradients over micro-batches and ranks; scaling each summed loss like this
    # makes the step's gradient the mean over every loss unit (e.g. loss-bearing token) of the global batch.
    scale = r.cfg.train.grad_accum * engine.ranks_averaged / max(n_loss, 1)
    loss_t, grad_norm = torch.zeros((), dtype=torch.float64, device=engine.device), None
    sums: dict[str, torch.Tensor] = {}
    passes = r.task.passes  # optimizer steps over the same micro-batches (1 but for GRPO's μ)
    for _ in range(passes):
        for b in micro:
            out = r.task.loss(engine, b, r.cfg.engine.loss_chunk_tokens)
            engine.backward(out.sum * scale)
            grad_norm = engine.step()
            loss_t += out.sum.detach()  # stays on the device: no host sync per micro-batch
            add_sums(sums, out.metrics)
    every_min = r.cfg.checkpoint.every_minutes
    due = bool(every_min) and time.monotonic() - r.last_save >= 60 * every_min
    names = sorted(batch.source_tokens)  # (a mixture: every rank has every source's name)
    loss_sum, n_signalled, n_due, *totals = dist.all_sum(
        loss_t,
        len(r.signals.received),
        due,
        *(batch.source_tokens[k] for k in names),
        *tasks.MetricSums.elements(sums),
    )
    # (sequence parallelism: the ranks of a group read the same rows)
    sources = {k: int(v) // r.cfg.engine.sequence_parallel for k, v in zip(names, totals, strict=False)}
    totals = totals[len(names) :]
    dt = time.perf_counter() - t0
    states = engine.take_model_states()
    metrics = StepMetrics(
        loss=loss_sum / max(n_loss * passes, 1),  # (the mean over the passes)
        lr=lr,
        grad_norm=grad_norm,
        tokens=int(n_tokens),
        loss_tokens=int(n_loss),
        padding=1 - n_tokens / n_pos,
        tokens_per_s=n_tokens / dt,
        loss_tokens_per_s=n_loss / dt,
        step_time_s=dt,
        mfu=r.flops.per_token(micro) * n_tokens / dt / (r.peak_flops * r.env.world_size)
        if r.peak_flops
        else None,
        epoch=batch.epoch_progress,
        elapsed_s=perf.process_age_s(),
        skipped_steps=engine.skipped_steps,
        memory=perf.device_memory_mb(),
        task=tasks.MetricSums.read(sums, totals).record(max(n_loss * passes, 1)),
        model_states=ModelStates(
            engine.n_params, states, r.formula, engine.n_trainable if r.cfg.model.peft else None
        )
        if states
        else None,
        sources=sources,
    )
    return metrics, Agreed(stop=bool(n_signalled), save_due=bool(n_due))


def save(r: Run, step: int, data_state: dict) -> None:
    t0 = time.perf_counter()
    path = r.ckpt.save(r.engine, TrainState(step, data_state, r.tracker.run_id), dump_config(r.cfg))
    r.last_save, seconds = time.monotonic(), time.perf_counter() - t0
    r.tracker.info(f"saved checkpoint {path} in {seconds:.1f} s")
    r.tracker.log(step, {"checkpoint_save_s": seconds})


def export(r: Run) -> None:
    """Every rank joins the gather of the full weights; rank 0 writes `final/` and answers the sample
    prompts."""
    r.loader.close()
    _still_ours(r, "exporting final/")
    note = write_final(
        r.engine, r.cfg, r.tok, r.task.auto_class, r.out / "final", r.env.is_main, r.ckpt.base_sha256
    )
    if note is None:
        return
    r.tracker.info(f"exported Hugging Face model to {r.out / 'final'}{note}")
    track = r.cfg.track
    if track.sample_prompts and r.task.auto_class == "AutoModelForCausalLM":
        tok, model = inference.load(str(r.out / "final"))
        with r.engine.plain_attention():
            answers = inference.generate(
                tok,
                model,
                [[{"role": "user", "content": p}] for p in track.sample_prompts],
                max_new_tokens=track.sample_max_new_tokens,
                temperature=0.0,
            )
        rows = [{"prompt": p, "answer": a} for p, a in zip(track.sample_prompts, answers, strict=True)]
        r.tracker.samples(r.total_steps, rows)


def _still_ours(r: Run, before: str) -> None:
    """Every rank stops (`LockLost`, exit 4) if rank 0 no longer holds output.dir's lock."""
    lost = None
    if r.env.is_main:
        try:
            r.ckpt.before_publish(before)
        except LockLost as e:
            lost = e
    if dist.broadcast_object(lost is not None):
        raise lost or LockLost(f"rank 0 lost output.dir's run lock; stopped before {before}")


def close(r: Run, exit_code: int = 0) -> None:
    r.loader.close()
    r.engine.close()
    dist.shutdown()  # every rank is past its last collective
    r.tracker.close(exit_code)


# ---------------------------------------------------------------- setup


def setup(
    cfg: Config, env: dist.DistEnv, signals: Signals, lock: RunLock | None = None, faults: Faults = NONE
) -> Run:
    """The setup phases (`setup.py`: data, model, engine and restore) run every check that can reject bad
    input before anything but the run lock is written; then `rundir.commit` cleans, replaces
    (output.overwrite) and writes config.yaml, and tracking starts."""
    # rank 0 decides where the run starts and in which precision; every rank follows
    plan = resume_plan(cfg, env.rank, env.world_size)
    precision = plan.precision
    d = phases.data(cfg, env, faults)
    faults.in_setup()
    model = phases.model(cfg, d, precision)
    res = phases.engine_and_restore(cfg, env, d, model, plan, lock, faults)
    task = phases.with_live_reference(cfg, d, precision)
    out, engine, t = Path(cfg.output.dir), res.engine, cfg.train
    if env.is_main:  # every check passed: the first writes
        rundir.commit(out, dump_config(cfg), res.plan.replace)
        # a resumed run rewrites the steps after its checkpoint
        truncate_metrics(out / "metrics.jsonl", res.state.step)
    dist.wait_for_all("rank 0 prepares output.dir")
    tracker = Tracker(
        out,
        env.rank,
        total_steps=d.total_steps,
        log_every=t.log_every,
        start_step=res.state.step,
        all_ranks=cfg.output.log_all_ranks,
        track=cfg.track,
        run_id=res.state.run_id,
        config=yaml.safe_load(dump_config(cfg)),
    )
    formula = perf.expected_model_state_bytes(
        engine.n_params, cfg.engine.zero_stage, env.world_size, precision, engine.n_trainable
    )
    r = Run(
        cfg,
        env,
        task,
        d.tok,
        res.prep,
        engine,
        res.ckpt,
        tracker,
        StepLoader(res.prep, d.stream, t.grad_accum, pin=engine.device.type == "cuda"),
        out,
        res.state.step,
        d.total_steps,
        perf.FlopCount.of(engine.module),
        perf.peak_flops(),
        formula,
        signals,
        DivergenceGuard(t.nonfinite_patience, precision),
    )
    _report_start(r, precision, res.plan, d.stream, res.load_s)
    # rank 0 may still be starting W&B; the loop's first collective must not time out on it
    dist.wait_for_all("setup")
    signals.in_setup = (
        False  # from here a signal sets a flag; the ranks agree on it at the next step boundary
    )
    return r


def _report_start(r: Run, precision: str, plan: ResumePlan, stream, t_load: float) -> None:
    cfg, env, prep, tracker, total_steps = r.cfg, r.env, r.prep, r.tracker, r.total_steps
    if plan.path is not None:
        tracker.info(
            f"resumed from {plan.path}"
            f"{' (resharded to this world size / ZeRO stage)' if plan.reshard else ''}: "
            f"step {r.start}, data epoch {stream.epoch} sample {stream.index:,}, "
            f"model + optimizer + LR schedule + RNG restored in {t_load:.1f} s{plan.describe_skipped()}"
        )
        if plan.applied:
            tracker.info(
                f"resume: applied settings changed since the checkpoint: {plan.describe_applied()} "
                "(Adam moments and step count kept)"
            )
        tracker.log(r.start, {"checkpoint_load_s": t_load})
    tracker.info(f"data: shards {prep.root} (dataset {prep.fingerprint})")
    # a packed row holds whole groups (a preference pair: 2 x max_seq_len)
    width = prep.seq_len * r.task.group
    tracker.info(_data_summary("train", prep.train, width))
    if isinstance(prep.train.items, mixture.MixedRows) and prep.weights:
        tracker.info(mixture.describe(prep.train.items, prep.weights))
    if prep.val:
        tracker.info(_data_summary("validation", prep.val, width))
    t, unit, sp = cfg.train, "rows" if prep.packing else "examples", cfg.engine.sequence_parallel
    readers = env.world_size // sp
    ranks = f"data-parallel ranks (sequence parallel: {sp} ranks per sequence)" if sp > 1 else "ranks"
    tracker.info(
        f"world {env.world_size} | ZeRO {cfg.engine.zero_stage} | {precision} | global batch = "
        f"{t.micro_batch_size} micro x {t.grad_accum} accum x {readers} {ranks} = "
        f"{t.micro_batch_size * t.grad_accum * readers} {unit} | {total_steps} steps | "
        f"task {cfg.data.task}"
    )
    tracker.info(
        f"rank {env.rank} of {env.world_size} (local rank {env.local_rank}) on {socket.gethostname()} | "
        f"master {env.master_addr}:{env.master_port}"
        f" | {torch.distributed.get_backend() if torch.distributed.is_initialized() else 'no'} process group"
    )


def _data_summary(name: str, split: dataset.Split, seq_len: int) -> str:
    s = split.stats
    rows = (
        f", {s.rows} packed rows of {seq_len} (padding {100 * s.padding_fraction:.1f}%)"
        if s.rows is not None and s.padding_fraction is not None  # (a packed split has both)
        else ""
    )
    return (
        f"{name}: {s.records} records -> {s.examples} examples{rows}; {s.tokens:,} tokens, "
        f"{s.loss_tokens:,} loss-bearing; over max_seq_len: {s.truncated} truncated, {s.dropped} dropped"
    )


def _exit_preempted(is_main: bool) -> None:
    """The checkpoint is complete. Rank 0 alone exits 75 (requeue me), and last: the other ranks leave
    first with 0, so `srun --kill-on-bad-exit` has no one left to kill and reports 75, not a signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not is_main:
        os._exit(0)
    time.sleep(1.0)
    raise SystemExit(EXIT_PREEMPTED)
