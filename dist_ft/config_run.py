"""The config's sections of how a run goes: the optimization loop (`train:`), DeepSpeed (`engine:`), saving
and resuming (`checkpoint:`), the run directory (`output:`) and experiment tracking (`track:`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .config_section import APPLIED, MUST_MATCH, RESHARD, RESOLVED, Section, on_resume


def _two_betas(cls, v: Any) -> Any:
    if not (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(type(b) in (int, float) and 0 <= b < 1 for b in v)
    ):
        raise ValueError("must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    return v


class TrainConfig(Section):
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps to run; overrides `epochs` when set.",
        json_schema_extra=on_resume(APPLIED),
    )
    epochs: float = Field(
        1.0,
        gt=0,
        description="Passes over the training data when `max_steps` is unset.",
        json_schema_extra=on_resume(APPLIED),
    )
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="Rows (packed) or examples (padded) per rank per forward pass.",
        json_schema_extra=on_resume(RESHARD),
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches accumulated per optimizer step. Global batch = micro x accum x world "
        "size.",
        json_schema_extra=on_resume(RESHARD),
    )
    lr: float = Field(
        2e-5, gt=0, description="Peak learning rate (AdamW).", json_schema_extra=on_resume(APPLIED)
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW decoupled weight decay; 0.0 is usual for short fine-tunes.",
        json_schema_extra=on_resume(APPLIED),
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW betas.", json_schema_extra=on_resume(APPLIED)
    )
    _betas = field_validator("betas", mode="before")(_two_betas)
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.", json_schema_extra=on_resume(APPLIED))
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup steps from 0 to `lr`.", json_schema_extra=on_resume(APPLIED)
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warmup.", json_schema_extra=on_resume(APPLIED)
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Final LR as a fraction of `lr` (cosine/linear).",
        json_schema_extra=on_resume(APPLIED),
    )
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="Clip the global gradient norm to this; 0 disables clipping.",
        json_schema_extra=on_resume(APPLIED),
    )
    seed: int = Field(
        42,
        description="Seed for model init of new tokens, dropout and sampling.",
        json_schema_extra=on_resume(MUST_MATCH),
    )
    eval_every: int = Field(0, ge=0, description="Run validation every N steps (0: only at the end).")
    log_every: int = Field(
        1, ge=1, description="Print a console metrics line every N steps (JSONL gets every step)."
    )
    nonfinite_patience: int | None = Field(
        None,
        ge=0,
        description="Consecutive steps with a non-finite loss or gradient norm tolerated before the run "
        "stops with exit 3 (no checkpoint is written meanwhile); None: 0, or 25 in fp16 where loss-scale "
        "overflows skip steps.",
    )


class EngineConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 +gradients, 3 "
        "+parameters sharded.",
        json_schema_extra=on_resume(RESHARD),
    )
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast", "fp16"] = Field(
        "auto",
        description="`bf16`: bf16 weights + fp32 master copies (least memory); `bf16-autocast`: fp32 "
        "weights, bf16 matmuls (torch autocast, as HF Trainer / TRL; learns like fp32 at small learning "
        "rates); `auto`: where the hardware runs bf16 natively (GPU compute capability 8+, CPU with "
        "AVX512-BF16/AMX) bf16-autocast at ZeRO 0-2 and bf16 at ZeRO-3 or with offload_optimizer, fp16 with "
        "loss scaling on older GPUs, else fp32. A resume continues in the checkpoint's precision (`auto` "
        "follows it, another explicit value is refused).",
        json_schema_extra=on_resume(RESOLVED),
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Ranks that split each sequence between them (DeepSpeed's Ulysses attention: heads <-> "
        "sequence all-to-alls); 1: off. The world size must be a multiple (data parallel = world / this); "
        "the model's attention heads too. SFT, pretrain and DPO (packed or not), sdpa or flash attention.",
        json_schema_extra=on_resume(MUST_MATCH),
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; `auto`: nccl on GPUs, gloo on CPU."
    )
    collective_timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="A collective (all-reduce, broadcast) that waits longer than this fails the job; waits "
        "for one rank's own work (tokenizing, checkpoint fsync, export) never count against it, but a rank "
        "whose heartbeat (every 5 s or less) is this old while others wait for it is dead: they stop, naming "
        "it.",
    )
    loss_chunk_tokens: int = Field(
        4096,
        ge=0,
        description="Loss-bearing positions per chunk of the fused output layer + cross-entropy, so the "
        "tokens x vocab logits are never held whole (memory ~ chunk x vocab); 0: the plain path (all "
        "logits, then cross-entropy).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> EngineConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage: 3")
        return self


class CheckpointConfig(Section):
    every_steps: int = Field(
        0,
        ge=0,
        description="Save a resumable checkpoint every N optimizer steps (0: only at the end and on a "
        "signal).",
    )
    every_minutes: float = Field(
        0.0,
        ge=0,
        description="Also save when this many minutes passed since the last save (0: off); ranks agree.",
    )
    keep: int = Field(
        2,
        ge=1,
        description="Complete checkpoints kept; older ones are deleted only after a new one is complete.",
    )
    keep_every: int = Field(
        0,
        ge=0,
        description="Besides the newest `keep`, also keep for good every checkpoint whose step is a "
        "multiple of this (0: off).",
    )
    resume: str = Field(
        "auto",
        description="`auto`: continue from the newest complete checkpoint in output.dir; `never`: start "
        "fresh (refused where output.dir holds checkpoints, unless output.overwrite); or a checkpoint path. "
        "Changed optimizer/schedule settings (lr, betas, eps, weight_decay, warmup, schedule, max_steps) "
        "are applied over the checkpoint's and logged.",
    )
    trust_foreign: bool = Field(
        False,
        description="Allow `resume` to name a checkpoint outside output.dir. Loading one unpickles its "
        "files: only for checkpoints you trust.",
    )
    signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        ["SIGTERM", "SIGUSR1"],
        description="Signals that make every rank save at the next step boundary and exit with status 75 "
        "(requeue me).",
    )


class OutputConfig(Section):
    dir: str = Field(
        "runs/default",
        description="Run directory: resolved config, metrics.jsonl, loss.png, final/ (HF model).",
    )
    overwrite: bool = Field(
        False,
        description="Start a fresh run here, replacing the earlier run's checkpoints, metrics, final/ and "
        "W&B files once the new run validated, only in a directory a dist_ft run owns (.dist_ft-run.json); "
        "it is never resumed (only a requeued SLURM job continues its own checkpoints). Other files are "
        "left alone.",
    )
    lock_stale_minutes: float = Field(
        5.0,
        gt=0,
        description="The run lock (output.dir/.dist_ft.lock, heartbeat every 30 s) of a run on another host, "
        "container or boot is taken over after this long without a heartbeat; in the same pid namespace a "
        "dead owner is detected at once.",
    )
    log_all_ranks: bool = Field(
        False, description="Debugging: every rank > 0 also writes rank-R.log and metrics-rank-R.jsonl."
    )


class TrackConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="Weights & Biases on rank 0. `auto`: online when WANDB_API_KEY is set, else offline "
        "files under output.dir/wandb (WANDB_MODE wins).",
    )
    project: str = Field("dist-ft", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); None: your default.")
    run_name: str | None = Field(None, description="W&B run name; None: the output directory's name.")
    tags: list[str] = Field([], description="W&B run tags.")
    sample_prompts: list[str] = Field(
        [],
        description="User prompts answered by the final model; answers go to samples.jsonl and a W&B table.",
    )
    sample_max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample prompt.")

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "disabled" if v is False else v  # YAML reads `off` / `false` as False
