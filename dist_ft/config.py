"""Typed run configuration: YAML file + dotted CLI overrides -> validated `Config` tree.

Every field has a one-line description; `reference_markdown()` renders them for the README.
Unknown keys are errors with a did-you-mean; wrong types name the key and the expected type.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config_explain import explain
from .config_section import Section
from .errors import UserError
from .redact import env_secrets, scrub, url_secret
from .task_settings.dpo import DpoConfig
from .task_settings.reward import RewardConfig


def task_names() -> list[str]:
    """Every task this installation has: the modules of dist_ft/tasks (found without importing them)."""
    import pkgutil

    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent / "tasks")])
        if not m.name.startswith("_")
    )


def _no_credentials(cls, v: str | None) -> str | None:
    what = (
        url_secret(v) if v else None
    )  # the config is saved in config.yaml, logs and W&B: it must hold no secret
    if what is not None:
        held = "credentials" if what == "credentials" else f"a token (its '{what}=' query parameter)"
        raise ValueError(
            f"a URL with {held} in it is refused (the config is saved in config.yaml, logs and W&B); remove them from it and "
            'put them in the environment: the storage\'s own variables, or DIST_FT_STORAGE_OPTIONS=\'{"key": ..., "secret": ...}\''
        )
    return v


def _two_betas(cls, v: Any) -> Any:
    if not (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(type(b) in (int, float) and 0 <= b < 1 for b in v)
    ):
        raise ValueError("must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    return v


# What changing a setting between a checkpoint and its resume does (resume.py reads it from the fields; a section's
# `resume_default` applies to fields without their own, `free` where unset):
MUST_MATCH = "must_match"  # breaks an exact resume: refused
RESHARD = (
    "reshard"  # must match, unless the run reshards (another world size or ZeRO stage, the global batch kept)
)
APPLIED = "applied"  # applied over the checkpoint's value (the Adam moments and step count kept) and logged
FREE = "free"  # does not change what the continued run computes
RESUME_KINDS = (MUST_MATCH, RESHARD, APPLIED, FREE)


def on_resume(kind: str) -> dict[str, Any]:
    """A field's resume rule, as `Field(..., json_schema_extra=on_resume(APPLIED))`."""
    assert kind in RESUME_KINDS, kind
    return {"on_resume": kind}


class _Section(Section):
    resume_default: ClassVar[str] = FREE


class PeftConfig(_Section):
    method: Literal["lora", "prefix"] = Field(
        "lora",
        description="`lora`: low-rank adapters on the projections; `prefix`: trained virtual key/value prefixes (prefix tuning).",
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA input (0 for exact merged == adapter logits)."
    )
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="`auto`: every linear / Conv1D projection in the blocks (not the output head); or module names, e.g. [q_proj, v_proj].",
    )
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix tuning: virtual tokens per layer.")
    train_new_tokens: bool = Field(
        True,
        description="Also train the embedding rows of tokens the tokenizer gained (ChatML markers on a base model); frozen random rows otherwise.",
    )


class ModelConfig(_Section):
    resume_default: ClassVar[str] = MUST_MATCH
    path: str = Field(
        "gpt2",
        description="Hub id, local directory, or `pkg://<python package>` (a directory shipped inside an installed package).",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `path` to load (dequantized to a regular model)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Allow model/tokenizer code from the hub to run. Off unless you trust the repo."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers pick (sdpa where supported)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (slower)."
    )
    chat_template: Literal["auto", "chatml"] = Field(
        "auto",
        description="`auto`: keep the tokenizer's template, add ChatML if it has none; `chatml`: always use our ChatML template.",
    )
    peft: PeftConfig | None = Field(
        None,
        description="Parameter-efficient fine-tuning (LoRA or prefix tuning, with `peft`); None: every weight trains.",
    )
    _no_url_credentials = field_validator("path")(_no_credentials)


class SourceConfig(_Section):
    path: str = Field(
        ..., description="Local .jsonl/.json/.parquet file or directory, or a Hugging Face dataset name."
    )
    split: str = Field("train", description="Split to read when `path` is a dataset name or directory.")
    subset: str | None = Field(
        None, description="Dataset configuration name (the `name` argument of `datasets.load_dataset`)."
    )
    streaming: bool = Field(
        False,
        description="Read a hub dataset as a stream (`load_dataset(streaming=True)`): nothing is downloaded whole.",
    )
    _no_url_credentials = field_validator("path")(_no_credentials)


class DataConfig(_Section):
    resume_default: ClassVar[str] = (
        MUST_MATCH  # where shards are cached and how they are built or checked do not change the data
    )
    train: SourceConfig | None = Field(
        None,
        description="Training data source (a path string is accepted as shorthand); not needed with `prepared`.",
    )
    validation: SourceConfig | None = Field(
        None, description="Separate validation source; if unset, `val_fraction` of train is held out."
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of training records held out for validation when no `validation` source is given.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = Field(
        "auto", description="Record format; `auto` detects it per record from the keys."
    )
    task: str = Field(
        "sft",
        description="What is learned: a module of dist_ft/tasks. `sft`: loss on assistant turns only; `pretrain`: loss on every token of raw text; `dpo`: preference pairs (prompt, chosen, rejected); `classify`: a sequence head on {text, label}; `reward`: a one-output head on preference pairs.",
    )
    max_seq_len: int = Field(1024, ge=8, description="Tokens per packed row / longest example kept.")
    packing: bool = Field(
        True,
        description="Pack examples into rows of `max_seq_len` (position ids restart per example); false = pad to the longest in batch.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="What to do with an example longer than `max_seq_len` (always counted and reported).",
    )
    seed: int = Field(1234, description="Seed for the validation split and the per-epoch shuffle.")
    prepared: str | None = Field(
        None,
        description="Directory or fsspec URL (s3://...) written by `dist-ft prepare`: train reads its shards and tokenizes nothing.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where train builds shards on the fly (keyed by data, tokenizer and settings) and caches remote ones; None: $DIST_FT_CACHE or ~/.cache/dist_ft.",
        json_schema_extra=on_resume(FREE),
    )
    shard_tokens: int = Field(
        1 << 25, ge=1, description="Tokens per shard file (the last one of a split may hold fewer)."
    )
    shuffle_window: int = Field(
        1 << 16,
        ge=1,
        description="Rows shuffled together in an epoch, after the shard order is shuffled; memory is O(window).",
    )
    num_proc: int = Field(
        0,
        ge=0,
        description="Processes that tokenize in prepare (0: every core); sources under 2048 records use one.",
        json_schema_extra=on_resume(FREE),
    )
    verify_shards: bool = Field(
        True,
        description="Check each shard's sha256 against the manifest when a run opens it (sizes are always checked).",
        json_schema_extra=on_resume(FREE),
    )
    _no_url_credentials = field_validator("prepared", "cache_dir")(_no_credentials)

    @model_validator(mode="after")
    def _some_source(self) -> DataConfig:
        if self.train is None and self.prepared is None:
            raise ValueError(
                "give data.train (a file, directory or hub dataset) or data.prepared (shards from dist-ft prepare)"
            )
        return self

    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("DIST_FT_CACHE") or "~/.cache/dist_ft").expanduser()

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        have = task_names()
        if v not in have:
            close = difflib.get_close_matches(v, have, n=1)
            raise ValueError(
                f"unknown task '{v}'{f' (did you mean {close[0]!r}?)' if close else ''}; tasks: {', '.join(have)}"
            )
        return v

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v


class TrainConfig(_Section):
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
        description="Micro-batches accumulated per optimizer step. Global batch = micro x accum x world size.",
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
        description="Consecutive steps with a non-finite loss or gradient norm tolerated before the run stops with exit 3 (no checkpoint is written meanwhile); None: 0, or 25 in fp16 where loss-scale overflows skip steps.",
    )


class EngineConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 +gradients, 3 +parameters sharded.",
        json_schema_extra=on_resume(RESHARD),
    )
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast", "fp16"] = Field(
        "auto",
        description="`bf16`: bf16 weights + fp32 master copies (least memory); `bf16-autocast`: fp32 weights, bf16 matmuls (torch autocast, as HF Trainer / TRL); `auto`: bf16 where the hardware runs it natively (GPU compute capability 8+, CPU with AVX512-BF16/AMX), fp16 with loss scaling on older GPUs, else fp32.",
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
        description="A collective (all-reduce, broadcast) that waits longer than this fails the job; waits for one rank's own work (tokenizing, checkpoint fsync, export) never count against it, but a rank whose heartbeat (every 5 s or less) is this old while others wait for it is dead: they stop, naming it.",
    )
    loss_chunk_tokens: int = Field(
        4096,
        ge=0,
        description="Loss-bearing positions per chunk of the fused output layer + cross-entropy, so the tokens x vocab logits are never held whole (memory ~ chunk x vocab); 0: the plain path (all logits, then cross-entropy).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> EngineConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage: 3")
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(
        0,
        ge=0,
        description="Save a resumable checkpoint every N optimizer steps (0: only at the end and on a signal).",
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
        description="Besides the newest `keep`, also keep for good every checkpoint whose step is a multiple of this (0: off).",
    )
    resume: str = Field(
        "auto",
        description="`auto`: continue from the newest complete checkpoint in output.dir; `never`: start fresh (refused where output.dir holds checkpoints, unless output.overwrite); or a checkpoint path. Changed optimizer/schedule settings (lr, betas, eps, weight_decay, warmup, schedule, max_steps) are applied over the checkpoint's and logged.",
    )
    trust_foreign: bool = Field(
        False,
        description="Allow `resume` to name a checkpoint outside output.dir. Loading one unpickles its files: only for checkpoints you trust.",
    )
    signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        ["SIGTERM", "SIGUSR1"],
        description="Signals that make every rank save at the next step boundary and exit with status 75 (requeue me).",
    )


class OutputConfig(_Section):
    dir: str = Field(
        "runs/default",
        description="Run directory: resolved config, metrics.jsonl, loss.png, final/ (HF model).",
    )
    overwrite: bool = Field(
        False,
        description="Start a fresh run here, replacing the earlier run's checkpoints, metrics, final/ and W&B files once the new run validated, only in a directory a dist_ft run owns (.dist_ft-run.json); it is never resumed (only a requeued SLURM job continues its own checkpoints). Other files are left alone.",
    )
    lock_stale_minutes: float = Field(
        5.0,
        gt=0,
        description="The run lock (output.dir/.dist_ft.lock, heartbeat every 30 s) of a run on another host, container or boot is taken over after this long without a heartbeat; in the same pid namespace a dead owner is detected at once.",
    )
    log_all_ranks: bool = Field(
        False, description="Debugging: every rank > 0 also writes rank-R.log and metrics-rank-R.jsonl."
    )


class TrackConfig(_Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="Weights & Biases on rank 0. `auto`: online when WANDB_API_KEY is set, else offline files under output.dir/wandb (WANDB_MODE wins).",
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


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="What to fine-tune.")
    data: DataConfig = Field(..., description="What to train on.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization and loop settings.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="DeepSpeed: ZeRO, precision, offload."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Fault tolerance: saving and resuming."
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    track: TrackConfig = Field(
        default_factory=TrackConfig,
        description="Experiment tracking: Weights & Biases and sample generations.",
    )
    # each task's own settings (task_settings/<task>.py), as cfg.<task>
    dpo: DpoConfig = Field(
        default_factory=DpoConfig, description="Preference tuning (data.task: dpo): loss and beta."
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig, description="Reward models (data.task: reward)."
    )

    @model_validator(mode="after")
    def _prefix_unpacked(self) -> Config:
        if self.model.peft is not None and self.model.peft.method == "prefix" and self.data.packing:
            # the virtual tokens enter as a KV cache, and transformers separates packed examples only without one
            raise ValueError(
                "model.peft.method prefix needs data.packing: false (packed examples would attend to each other "
                "through the prefix's cache); set data.packing=false"
            )
        return self


# ---------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif isinstance(nxt, str) and k in ("train", "validation"):  # path shorthand
            nxt = node[k] = {"path": nxt}
        elif not isinstance(nxt, dict):
            raise UserError(
                f"{where}: '{'.'.join(keys[: keys.index(k) + 1])}' is a value, not a section; cannot set '{dotted}'"
            )
        node = nxt
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read YAML (optional), apply `a.b.c=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(
                f"{p}: config file not found; pass the path of a YAML file such as configs/demo.yaml"
            )
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark else ""
            raise UserError(
                f"{p}{at}: invalid YAML: {getattr(e, 'problem', e)}; fix the syntax there"
            ) from None
        if not isinstance(tree, dict):
            raise UserError(
                f"{p}: top level must be a mapping of sections (model, data, train, engine, output)"
            )
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override '{scrub(ov)}': expected key=value, e.g. train.lr=3e-5")
        key, _, raw = ov.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, f"override '{scrub(ov)}'")
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        src = source + (" + overrides" if overrides else "")
        raise UserError(explain(e, src, Config)) from None


def _scrubbed(node: Any, secrets: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _scrubbed(v, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_scrubbed(v, secrets) for v in node]
    return scrub(node, secrets, environ={}) if isinstance(node, str) else node


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML: what config.yaml, checkpoints and W&B hold. The config has no secret fields and
    refuses URLs with credentials or tokens; as a second guard every string is scrubbed (`redact.scrub`: by pattern,
    and the credential values of the environment, not its other storage options, which could match a real value)."""
    secrets = [
        s for s in env_secrets(all_values=False) if len(s) >= 8
    ]  # a short one could be part of a real value
    return yaml.safe_dump(_scrubbed(cfg.model_dump(mode="json"), secrets), sort_keys=False)
