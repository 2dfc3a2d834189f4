"""The config's `data:` section: the sources (`SourceConfig`), the task, and how records become shards
(`DataConfig`)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .config_section import FREE, MUST_MATCH, Section, no_credentials, on_resume
from .errors import UserError


def task_names() -> list[str]:
    """Every task this installation has: the modules of dist_ft/tasks (found without importing them)."""
    import pkgutil

    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent / "tasks")])
        if not m.name.startswith("_")
    )


class SourceConfig(Section):
    path: str = Field(
        ..., description="Local .jsonl/.json/.parquet file or directory, or a Hugging Face dataset name."
    )
    split: str = Field("train", description="Split to read when `path` is a dataset name or directory.")
    subset: str | None = Field(
        None, description="Dataset configuration name (the `name` argument of `datasets.load_dataset`)."
    )
    streaming: bool = Field(
        False,
        description="Read a hub dataset as a stream (`load_dataset(streaming=True)`): nothing is downloaded "
        "whole.",
    )
    # a source in a list (a mixture, data/mixture.py)
    weight: float | None = Field(
        None, gt=0, description="In a mixture: this source's share of the samples (weights are normalized)."
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="In a mixture: the source's name in metrics and the manifest (default: the file stem).",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] | None = Field(
        None, description="In a mixture: this source's record format (None: data.format)."
    )
    task: Literal["sft", "pretrain"] | None = Field(
        None,
        description="In a mixture: `pretrain` trains on every token of this source's records (e.g. raw text "
        "mixed into SFT to keep general ability); None: data.task.",
    )
    _no_url_credentials = field_validator("path")(no_credentials)

    # what a source is made of; weight and name only say how a mixture uses it (not part of its shards)
    MIXING: ClassVar[tuple[str, ...]] = ("weight", "name", "format", "task")

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).stem or self.path).replace(" ", "_")


def _one_or_list(v: Any) -> str:
    return "source-list" if isinstance(v, list) else "one-source"


# one source, or a list (a mixture): the shape of the value picks the branch, so an error names only its own
# (config_explain leaves the branch's tag out of the key)
Sources = Annotated[
    Annotated[SourceConfig, Tag("one-source")] | Annotated[list[SourceConfig], Tag("source-list")],
    Discriminator(_one_or_list),
]
UNION_TAGS = ("one-source", "source-list")


class DataConfig(Section):
    # where shards are cached and how they are built or checked do not change the data
    resume_default: ClassVar[str] = MUST_MATCH
    train: Sources | None = Field(
        None,
        description="Training data source (a path string is accepted as shorthand); a list is a weighted "
        "mixture (each source with `weight`, see data/mixture.py); not needed with `prepared`.",
    )
    validation: Sources | None = Field(
        None,
        description="Separate validation source(s) (a list: each scored and logged on its own); if unset, "
        "`val_fraction` of train (of each source of a mixture) is held out.",
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of training records held out for validation when no `validation` source is "
        "given.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = Field(
        "auto", description="Record format; `auto` detects it per record from the keys."
    )
    task: str = Field(
        "sft",
        description="What is learned: a module of dist_ft/tasks. `sft`: loss on assistant turns only; "
        "`pretrain`: loss on every token of raw text; `dpo`: preference pairs (prompt, chosen, rejected); "
        "`classify`: a sequence head on {text, label}; `reward`: a one-output head on preference pairs.",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant",
        description='SFT: which assistant turns carry loss (a message\'s `"train": false` excludes it '
        "either way).",
    )
    max_seq_len: int = Field(1024, ge=8, description="Tokens per packed row / longest example kept.")
    packing: bool = Field(
        True,
        description="Pack examples into rows of `max_seq_len` (position ids restart per example); false = "
        "pad to the longest in batch.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="What to do with an example longer than `max_seq_len` (always counted and reported).",
    )
    seed: int = Field(1234, description="Seed for the validation split and the per-epoch shuffle.")
    prepared: str | None = Field(
        None,
        description="Directory or fsspec URL (s3://...) written by `dist-ft prepare`: train reads its shards "
        "and tokenizes nothing.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where train builds shards on the fly (keyed by data, tokenizer and settings) and caches "
        "remote ones; None: $DIST_FT_CACHE or ~/.cache/dist_ft.",
        json_schema_extra=on_resume(FREE),
    )
    shard_tokens: int = Field(
        1 << 25, ge=1, description="Tokens per shard file (the last one of a split may hold fewer)."
    )
    shuffle_window: int = Field(
        1 << 16,
        ge=1,
        description="Rows shuffled together in an epoch, after the shard order is shuffled; memory is "
        "O(window).",
    )
    num_proc: int = Field(
        0,
        ge=0,
        description="Processes that tokenize in prepare (0: every core); sources under 2048 records use one.",
        json_schema_extra=on_resume(FREE),
    )
    verify_shards: bool = Field(
        True,
        description="Check each shard's sha256 against the manifest when a run opens it (sizes are always "
        "checked).",
        json_schema_extra=on_resume(FREE),
    )
    _no_url_credentials = field_validator("prepared", "cache_dir")(no_credentials)

    @model_validator(mode="after")
    def _some_source(self) -> DataConfig:
        if self.train is None and self.prepared is None:
            raise ValueError(
                "give data.train (a file, directory or hub dataset) or data.prepared (shards from dist-ft "
                "prepare)"
            )
        for key in ("train", "validation"):
            srcs = getattr(self, key)
            if isinstance(srcs, list):
                _check_mixture(key, srcs, self.task)
            elif srcs is not None and any(getattr(srcs, k) is not None for k in ("weight", "name", "task")):
                raise ValueError(
                    f"data.{key}: weight, name and task belong to the sources of a list (a mixture); "
                    f"make data.{key} a list, or drop them"
                )
        return self

    @property
    def mixture(self) -> bool:
        """A list of training or validation sources (data/mixture.py)."""
        return isinstance(self.train, list) or isinstance(self.validation, list)

    def source(self, key: str) -> SourceConfig | None:
        """data.train or data.validation where the caller reads one source (a mixture is split into one-source
        configs first, data/mixture.py)."""
        v = getattr(self, key)
        if isinstance(v, list):
            raise UserError(
                f"data.{key} is a list of sources (a mixture), and this command reads one source; give one"
            )
        return v

    def sources(self, key: str) -> list[SourceConfig]:
        """data.train or data.validation as a list (empty where unset)."""
        v = getattr(self, key)
        return v if isinstance(v, list) else [] if v is None else [v]

    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("DIST_FT_CACHE") or "~/.cache/dist_ft").expanduser()

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        have = task_names()
        if v not in have:
            close = difflib.get_close_matches(v, have, n=1)
            raise ValueError(
                f"unknown task '{v}'{f' (did you mean {close[0]!r}?)' if close else ''}; tasks: "
                f"{', '.join(have)}"
            )
        return v

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return {"path": v} if isinstance(v, str) else v


def _check_mixture(key: str, srcs: list[SourceConfig], task: str) -> None:
    if not srcs:
        raise ValueError(f"data.{key}: an empty list; give at least one source")
    names = [s.label for s in srcs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"data.{key}: two sources are named {twice[0]!r}; give each a distinct `name` (metrics and "
            "shards are kept per source)"
        )
    if task not in ("sft", "pretrain"):
        raise ValueError(
            f"data.{key} as a list (a mixture) works with data.task sft or pretrain, not {task}; give one "
            "source"
        )
    if key == "train" and any(s.weight is None for s in srcs) and len(srcs) > 1:
        missing = next(s.label for s in srcs if s.weight is None)
        raise ValueError(f"data.train: source {missing!r} has no weight; give every source of a mixture one")
