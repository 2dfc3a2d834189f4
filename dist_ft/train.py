"""The training loop. Read it top to bottom: setup, then for each step: batch -> forward -> backward -> step -> log/eval, then export."""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import dist, engine as eng_mod, model as model_mod, perf
from .checkpoint import Checkpointer, resume_point
from .config import Config, dump_config
from .data import dataset
from .data.loader import StepLoader
from .errors import UserError
from .export import save_hf
from .track import Tracker, truncate_metrics

EXIT_PREEMPTED = 75  # saved on a signal; rerun (or requeue) the same command to continue


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_out_dir(cfg: Config, env: dist.DistEnv) -> Path:
    out = Path(cfg.output.dir)
    if (out / "final").exists() and not cfg.output.overwrite:
        raise UserError(f"output.dir '{out}' already holds a finished run (final/); choose another output.dir or set output.overwrite=true")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml.tmp").write_text(dump_config(cfg))
        (out / "config.yaml.tmp").replace(out / "config.yaml")
    return out


def _data_summary(name: str, split: dataset.Split, seq_len: int) -> str:
    s = split.stats
    rows = f", {s['rows']} packed rows of {seq_len} (padding {100 * s['padding_fraction']:.1f}%)" if "rows" in s else ""
    dropped = s["dropped_overlong"] + s["dropped_no_loss_after_truncation"]
    return (f"{name}: {s['records']} records -> {s['examples']} examples{rows}; {s['tokens']:,} tokens, "
            f"{s['loss_tokens']:,} loss-bearing; over max_seq_len: {s['truncated']} truncated, {dropped} dropped")


def evaluate(engine, prep: dataset.Prepared, micro: int, env: dist.DistEnv, chunk: int) -> dict:
    engine.eval()
    total, n = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    with torch.no_grad():
        for batch in dataset.eval_batches(prep, micro, env.rank, env.world_size):
            total += eng_mod.loss_sum(engine, batch, chunk)
            n += batch["n_loss"]
    engine.train()
    total, n = dist.all_sum(total, n)
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def run(cfg: Config) -> Path:
    try:
        return _run(cfg)
    except Exception as e:
        dist.report_failure(str(e))  # ranks waiting on this one stop instead of waiting forever
        raise


def _run(cfg: Config) -> Path:
    # ---- setup: everything that can reject bad input runs before anything is written
    env = dist.init(cfg.engine.dist_backend, cfg.engine.collective_timeout_minutes)
    precision = eng_mod.resolve_precision(cfg.engine.precision)
    t = cfg.train
    _seed_all(t.seed)
    tok = model_mod.load_tokenizer(cfg.model)
    prep = dataset.build(cfg.data, tok, env.local_rank, lambda failed: dist.patient_sum("token shards", failed),
                         log=print if env.local_rank == 0 else lambda *_: None)
    stream = prep.stream(t.micro_batch_size, env.rank, env.world_size)
    micro_steps_per_epoch = stream.n // (t.micro_batch_size * env.world_size)  # the ragged tail is not counted
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * micro_steps_per_epoch / t.grad_accum))
    out = _prepare_out_dir(cfg, env)
    zero3_loading = eng_mod.zero3_loading(cfg, precision)  # noqa: F841 - alive while the model loads sharded
    model = model_mod.load_model(cfg.model, tok, torch.float32)  # DeepSpeed casts to bf16/fp16 itself
    ckpt = Checkpointer(out, cfg.checkpoint.keep, env.rank, env.world_size, cfg.checkpoint.keep_every)
    resume_from, reshard = resume_point(cfg, ckpt, env.world_size)  # rank 0 decides, every rank follows
    engine = eng_mod.build(cfg, model, total_steps, precision, load_universal=reshard)
    engine.train()  # from_pretrained hands the model over in eval mode: dropout would be off for the whole run
    start, run_id = 0, None
    if resume_from is not None:
        t_load = time.perf_counter()
        state = ckpt.load(resume_from, engine, ckpt.universal(resume_from) if reshard else None)
        t_load = time.perf_counter() - t_load
        stream.load_state_dict(state["data"])
        start, run_id = state["step"], state.get("run_id")
    if env.is_main:
        truncate_metrics(out / "metrics.jsonl", start)  # a resumed run rewrites the steps after its checkpoint
    tracker = Tracker(out, env.rank, total_steps, t.log_every, start, cfg.output.log_all_ranks,
                      cfg.track, run_id, yaml.safe_load(dump_config(cfg)))
    if resume_from is not None:
        tracker.info(f"resumed from {resume_from}{' (resharded to this world size / ZeRO stage)' if reshard else ''}: "
                     f"step {start}, data epoch {stream.epoch} sample {stream.index:,}, "
                     f"model + optimizer + LR schedule + RNG restored in {t_load:.1f} s")
        tracker.log(start, {"checkpoint_load_s": t_load})
    signalled = []  # a signal only sets a flag; ranks agree on it at the next step boundary
    for name in cfg.checkpoint.signals:
        signal.signal(getattr(signal, name), lambda signum, frame: signalled.append(signum))
    last_save = time.monotonic()

    def save(step: int) -> None:
        nonlocal last_save
        t_save = time.perf_counter()
        path = ckpt.save(step, engine, {"step": step, "data": data_state, "run_id": tracker.run_id}, dump_config(cfg))
        last_save = time.monotonic()
        t_save = time.perf_counter() - t_save
        tracker.info(f"saved checkpoint {path} in {t_save:.1f} s")
        tracker.log(step, {"checkpoint_save_s": t_save})
    tracker.info(f"data: shards {prep.root} (dataset {prep.fingerprint})")
    tracker.info(_data_summary("train", prep.train, prep.seq_len))
    if prep.val:
        tracker.info(_data_summary("validation", prep.val, prep.seq_len))
    unit = "rows" if prep.packing else "examples"
    tracker.info(f"world {env.world_size} | ZeRO {cfg.engine.zero_stage} | {precision} | global batch = {t.micro_batch_size} micro x "
                 f"{t.grad_accum} accum x {env.world_size} ranks = {t.micro_batch_size * t.grad_accum * env.world_size} {unit} | {total_steps} steps")
    tracker.info(f"rank {env.rank} of {env.world_size} (local rank {env.local_rank}) | master {env.master_addr}:{env.master_port}"
                 f" | {torch.distributed.get_backend() if torch.distributed.is_initialized() else 'no'} process group")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    expected = perf.expected_model_state_bytes(n_params, cfg.engine.zero_stage, env.world_size, precision)
    flops_tok, peak = perf.flops_per_token(engine.module.config, n_params, prep.seq_len), perf.peak_flops()
    measured = {}  # filled at the second optimizer boundary: gradients exist and Adam has made its states

    def measure(e):
        if e.global_steps == 1:
            measured.update(perf.measured_model_state_bytes(e))

    chunk = cfg.engine.loss_chunk_tokens
    loader = StepLoader(prep, stream, t.grad_accum, pin=engine.device.type == "cuda")
    data_state = stream.state_dict()  # the position a checkpoint saved now would resume from
    dist.wait_for_all("setup")  # rank 0 may still be starting W&B; the loop's first collective must not time out on it

    # ---- the loop
    for step in range(start + 1, total_steps + 1):
        t0 = time.perf_counter()
        lr = eng_mod.lr(engine)
        batch = loader.next()  # collated on a background thread while the previous step ran
        micro, data_state = batch.batches, batch.data_state
        n_loss, n_tokens, n_pos = dist.all_sum(sum(b["n_loss"] for b in micro), sum(b["n_tokens"] for b in micro),
                                               sum(b["input_ids"].numel() for b in micro))
        # DeepSpeed averages gradients over micro-batches and ranks; scaling each summed loss like this
        # makes the step's gradient the mean over every loss-bearing token of the global batch.
        scale = t.grad_accum * env.world_size / max(n_loss, 1)
        loss_sum, grad_norm = torch.zeros((), dtype=torch.float64, device=engine.device), None
        for b in micro:
            loss = eng_mod.loss_sum(engine, b, chunk)
            engine.backward(loss * scale)
            grad_norm = eng_mod.step(engine, on_boundary=measure)
            loss_sum += loss.detach()  # stays on the device: no host sync per micro-batch
        every_min = cfg.checkpoint.every_minutes
        due_by_time = bool(every_min) and time.monotonic() - last_save >= 60 * every_min
        loss_sum, n_signalled, n_due = dist.all_sum(loss_sum, len(signalled), due_by_time)
        dt = time.perf_counter() - t0
        if step == 2 and measured:
            tracker.info(f"{n_params / 1e6:.2f}M params | model states per rank: {perf.format_table(expected, measured)}")
            tracker.log(step, {**{f"mem_{k}_bytes": v for k, v in measured.items()},
                               **{f"mem_formula_{k}_bytes": v for k, v in expected.items()}})
        tracker.log(step, {"loss": loss_sum / max(n_loss, 1), "lr": lr, "grad_norm": grad_norm,
                           "tokens": int(n_tokens), "loss_tokens": int(n_loss), "padding": 1 - n_tokens / n_pos,
                           "tokens_per_s": n_tokens / dt,
                           "loss_tokens_per_s": n_loss / dt, "step_time_s": dt,
                           "mfu": flops_tok * n_tokens / dt / (peak * env.world_size) if peak else None,
                           "epoch": batch.epoch_progress, "elapsed_s": perf.process_age_s(),
                           **({"skipped_steps": engine.skipped_steps} if precision == "fp16" else {}),  # fp16 overflows
                           **perf.device_memory_mb()})
        if prep.val and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
            tracker.log(step, evaluate(engine, prep, t.micro_batch_size, env, chunk))
        if n_signalled:
            save(step)
            tracker.info(f"stopped by signal after step {step}; exit {EXIT_PREEMPTED} - run the same command to resume")
            loader.close()
            _close(engine, tracker, EXIT_PREEMPTED)
            _exit_preempted(env.is_main)
        if step == total_steps or n_due or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            save(step)
        _kill_for_tests(step)

    # ---- export (every rank joins the gather; rank 0 writes)
    loader.close()
    state = eng_mod.full_state_dict(engine)
    if env.is_main:
        save_hf(engine.module, tok, state, out / "final")
        tracker.info(f"exported Hugging Face model to {out / 'final'}")
        if cfg.track.sample_prompts:
            tracker.samples(total_steps, _answers(out / "final", cfg.track))
    _close(engine, tracker)
    return out


def _answers(model_dir: Path, track) -> list[tuple[str, str]]:
    from . import chat

    tok, model = chat.load(str(model_dir))
    return [(p, chat.reply(tok, model, [{"role": "user", "content": p}], max_new_tokens=track.sample_max_new_tokens, temperature=0.0))
            for p in track.sample_prompts]


def _close(engine, tracker: Tracker, exit_code: int = 0) -> None:
    engine.destroy()  # stops the optimizer's helper threads (ZeRO-3 offload) before the group goes
    dist.shutdown()  # every rank is past its last collective
    tracker.close(exit_code)


def _exit_preempted(is_main: bool) -> None:
    """The checkpoint is complete. Rank 0 alone exits 75 (requeue me), and last: the other ranks leave
    first with 0, so `srun --kill-on-bad-exit` has no one left to kill and reports 75, not a signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not is_main:
        os._exit(0)
    time.sleep(1.0)
    raise SystemExit(EXIT_PREEMPTED)


def _kill_for_tests(step: int) -> None:
    """Test hook: SIGKILL this job's whole process group right after `step` (a hard crash)."""
    if os.environ.get("DIST_FT_TEST_KILL_AT_STEP") == str(step) and os.environ.get("RANK", "0") == "0":
        os.killpg(os.getpgid(0), signal.SIGKILL)
