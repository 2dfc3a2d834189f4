"""A training run's setup, as phases that take values and return values: data -> model -> engine -> restore
(after `resume.resume_plan` has fixed where the run starts and in which precision).

Every check that can reject bad input (config, tokenizer, data, model, resume point) runs in these phases,
before anything but the run lock is written; `train.setup` composes them, then writes the run directory
(`rundir.commit`) and starts tracking."""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from . import dist, reference, sequence_parallel, tasks
from .checkpoint import Checkpointer, ResumePlan, seed_all
from .config import Config
from .contracts import TrainState
from .data import dataset
from .data.stream import SampleStream
from .engine import Engine, gathered, zero3_init
from .errors import UserError
from .faults import Faults
from .model import load_model
from .runlock import RunLock
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class Data:
    """What is learned and from what: the task with its settings, the tokenizer, the token shards, this rank's
    sample stream (at its start) and the run's length in optimizer steps."""

    task: tasks.Task
    tok: PreTrainedTokenizerBase
    prep: dataset.Prepared
    stream: SampleStream
    total_steps: int


@dataclass(frozen=True)
class Restored:
    """The engine holding the model (its starting point or a checkpoint's state), where the run continues
    from, and the checkpointer that saves it."""

    engine: Engine
    ckpt: Checkpointer
    plan: ResumePlan
    state: TrainState
    prep: dataset.Prepared  # the data, with the reference log-probs a task needs attached
    load_s: float  # seconds to restore a checkpoint (0 for a fresh start)


def data(cfg: Config, env: dist.DistEnv, faults: Faults) -> Data:
    """Tokenizer and token shards (built on the fly, or read from `data.prepared`), checked record by
    record."""
    t, task, sp = cfg.train, tasks.for_config(cfg), cfg.engine.sequence_parallel
    # sequence parallelism: the ranks of a group read the same rows, each keeps its shard of them; checked
    # before any data is read: the world a multiple of sp, each group on one node
    reader, readers = sequence_parallel.readers(env.rank, env.world_size, sp)
    if sp > 1:
        hosts = dist.gather_on_main("sequence-parallel groups: each rank's node", socket.gethostname())
        why = dist.broadcast_object(sequence_parallel.spanning(hosts, sp) if hosts is not None else None)
        if why:
            raise UserError(why)
    seed_all(t.seed)
    tok = load_tokenizer(cfg.model)
    prep = dataset.build(
        cfg.data,
        tok,
        task,
        env.local_rank,
        lambda failed: int(dist.patient_sum("token shards", failed)),
        log=print if env.local_rank == 0 else lambda *_: None,
        faults=faults,
        task_for=tasks.get,  # (a mixture's source may be `task: pretrain`)
    )
    if sp > 1:
        rows = sequence_parallel.batch_rows(cfg)
        shard = partial(sequence_parallel.shard, sp_rank=env.rank % sp, sp=sp, rows=rows)
        prep = replace(prep, shard=partial(shard, pad_id=prep.pad_id))
    stream = prep.stream(t.micro_batch_size, reader, readers)
    # the ragged tail of an epoch (fewer samples than one micro-batch per rank) is not counted
    micro_steps_per_epoch = stream.n // (t.micro_batch_size * readers)
    total = t.max_steps or max(1, math.ceil(t.epochs * micro_steps_per_epoch / t.grad_accum))
    return Data(task, tok, prep, stream, total)


def model(cfg: Config, d: Data, precision: str) -> torch.nn.Module:
    """The model with the task's head, in fp32 (DeepSpeed casts to bf16/fp16 itself); under ZeRO-3 each rank
    only ever holds its shard of the weights."""
    m = load_model(
        cfg.model,
        d.tok,
        torch.float32,
        d.task.auto_class,
        init=partial(zero3_init, cfg, precision),
        gather=gathered,
        head=d.task.head(d.prep.meta) if d.task.head else None,
    )
    if d.task.prepare_model:
        d.task.prepare_model(m)
    return m


def with_live_reference(cfg: Config, d: Data, precision: str) -> tasks.Task:
    """The task, with a frozen engine of the starting model bound as its rollout's `reference` where it needs
    one live (GRPO's KL under full fine-tuning): loaded from model.path again, so a resumed run compares with
    the same start."""
    if not d.task.live_reference or d.task.rollout is None:
        return d.task
    ref = Engine.frozen(cfg, model(cfg, d, precision), precision)
    return replace(d.task, rollout=partial(d.task.rollout, reference=ref))


def engine_and_restore(
    cfg: Config,
    env: dist.DistEnv,
    d: Data,
    m: torch.nn.Module,
    plan: ResumePlan,
    lock: RunLock | None,
    faults: Faults,
) -> Restored:
    """The engine is built in the plan's precision (resharding a checkpoint of another world size / ZeRO
    stage where asked), the task's reference is attached to the data, and the planned checkpoint is loaded
    into the engine and the sample stream."""
    t, out, precision = cfg.train, Path(cfg.output.dir), plan.precision
    engine = Engine.build(
        cfg,
        m,
        d.total_steps,
        precision,
        load_universal=plan.reshard,
        fresh=plan.path is None,
        passes=d.task.passes,
    )
    prep, base_sha256 = reference.starting_point(cfg, d.task, d.prep, engine, precision, env)
    # (rank 0) a run suspended past the lock's stale age may have lost output.dir to another: checked before
    # anything is published
    ckpt = Checkpointer(
        out,
        cfg.checkpoint.keep,
        env.rank,
        env.world_size,
        cfg.checkpoint.keep_every,
        faults,
        base_sha256=base_sha256,
        precision=precision,
        before_publish=lock.verify if lock is not None else None,
    )
    state, t0 = TrainState(0, d.stream.state_dict()), time.perf_counter()
    if plan.path is not None:
        state = ckpt.load(plan, engine)
        d.stream.load_state_dict(state.data)
        if plan.applied:
            engine.apply_optimizer_settings(t.lr, t.betas, t.eps, t.weight_decay)
    return Restored(
        engine, ckpt, plan, state, prep, time.perf_counter() - t0 if plan.path is not None else 0.0
    )
