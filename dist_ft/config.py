"""Typed run configuration: YAML file + dotted CLI overrides -> validated `Config` tree.

Every field has a one-line description; `reference_markdown()` renders them for the README.
Unknown keys are errors with a did-you-mean; wrong types name the key and the expected type.

The sections are defined by job (`config_model.py`: the model; `config_data.py`: the data and task;
`config_run.py`: train, engine, checkpoint, output, track; `config_section.py`: their base and resume rules)
and composed here into `Config`, which also loads, overrides and dumps; every name is importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .config_data import DataConfig, SourceConfig, task_names
from .config_explain import explain
from .config_model import ModelConfig, PeftConfig
from .config_run import CheckpointConfig, EngineConfig, OutputConfig, TrackConfig, TrainConfig
from .config_section import APPLIED, FREE, MUST_MATCH, RESHARD, RESOLVED, RESUME_KINDS, Section, on_resume
from .errors import UserError
from .redact import env_secrets, scrub
from .task_settings.dpo import DpoConfig
from .task_settings.grpo import GrpoConfig
from .task_settings.reward import RewardConfig

__all__ = [
    "APPLIED",
    "FREE",
    "MUST_MATCH",
    "RESHARD",
    "RESOLVED",
    "RESUME_KINDS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DpoConfig",
    "EngineConfig",
    "ModelConfig",
    "OutputConfig",
    "PeftConfig",
    "RewardConfig",
    "Section",
    "SourceConfig",
    "TrackConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "on_resume",
    "task_names",
]


class Config(Section):
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
    grpo: GrpoConfig = Field(
        default_factory=GrpoConfig,
        description="Online RL (data.task: grpo): rollouts, rewards and the clipped-surrogate loss.",
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig, description="Reward models (data.task: reward)."
    )

    @model_validator(mode="after")
    def _prefix_unpacked(self) -> Config:
        if self.model.peft is not None and self.model.peft.method == "prefix" and self.data.packing:
            # the virtual tokens enter as a KV cache; transformers separates packed examples only without one
            raise ValueError(
                "model.peft.method prefix needs data.packing: false (packed examples would attend to each "
                "other through the prefix's cache); set data.packing=false"
            )
        return self

    @model_validator(mode="after")
    def _sequence_parallel(self) -> Config:
        sp = self.engine.sequence_parallel
        if sp == 1:
            return self
        if self.data.task not in ("sft", "pretrain", "dpo"):
            raise ValueError(
                f"engine.sequence_parallel {sp} works for data.task sft, pretrain and dpo, not "
                f"{self.data.task} (its head pools each sequence's last token on one rank); set "
                "engine.sequence_parallel: 1"
            )
        if self.model.attn_implementation == "eager":
            raise ValueError(
                f"engine.sequence_parallel {sp} needs model.attn_implementation sdpa or flash_attention_2 "
                "(eager builds a full attention mask that Ulysses cannot shard)"
            )
        if self.model.peft is not None and self.model.peft.method == "prefix":
            raise ValueError(
                f"engine.sequence_parallel {sp} does not work with model.peft.method prefix (its virtual "
                "tokens are a cache on every rank, not a shard of the sequence); use lora"
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
                f"{where}: '{'.'.join(keys[: keys.index(k) + 1])}' is a value, not a section; cannot set "
                f"'{dotted}'"
            )
        node = nxt
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
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
    """The resolved config as YAML: what config.yaml, checkpoints and W&B hold. The config has no secret
    fields and refuses URLs with credentials or tokens; as a second guard every string is scrubbed
    (`redact.scrub`: by pattern, and the credential values of the environment, not its other storage options,
    which could match a real value)."""
    # a short one could be part of a real value
    secrets = [s for s in env_secrets(all_values=False) if len(s) >= 8]
    return yaml.safe_dump(_scrubbed(cfg.model_dump(mode="json"), secrets), sort_keys=False)
