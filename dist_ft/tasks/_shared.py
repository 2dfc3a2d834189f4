"""What more than one task uses (a task never imports another task's module): a record's stats, the rows a
collate gets, preference pairs as examples (dpo, reward), and a sequence head's scores (classify, reward)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..config import DataConfig
from ..contracts import Batch
from ..data.chat import Example
from ..data.preference import to_pair, tokenize_pair
from ..data.shards.manifest import SplitStats
from ..errors import UserError
from . import Item, Model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def finish(examples: list[Example], stats: SplitStats | None = None) -> tuple[list[Example], SplitStats]:
    """A record's examples and its stats: one record, these examples and their tokens, with `stats`' truncated
    and dropped counts."""
    return examples, replace(
        stats or SplitStats(),
        records=1,
        examples=len(examples),
        tokens=sum(len(e.input_ids) for e in examples),
        loss_tokens=sum(e.n_loss for e in examples),
    )


def as_examples(items: Sequence[Item]) -> list[Example]:
    """Every example of `items`, in order (a row's examples one after another)."""
    return [ex for it in items for ex in (it if isinstance(it, list) else [it])]


def as_rows(items: Sequence[Item]) -> list[list[Example]]:
    """`items` as rows of examples (a lone example is a row of one)."""
    return [it if isinstance(it, list) else [it] for it in items]


def pair_examples(
    rec: dict, where: str, cfg: DataConfig, tok: PreTrainedTokenizerBase
) -> tuple[list[Example], SplitStats]:
    """A preference record's chosen and rejected sequences (prompt + completion through the chat template),
    checked: truncated to data.max_seq_len (or the pair dropped, data.overlong) only where both still differ
    and train."""
    if cfg.format != "auto":
        raise UserError(
            f"data.format '{cfg.format}' with data.task {cfg.task}: preference records have their own "
            "shapes; set data.format: auto"
        )
    pair = tokenize_pair(tok, to_pair(rec, where), where)
    if max(len(e.input_ids) for e in pair) <= cfg.max_seq_len:
        return finish(list(pair))
    if cfg.overlong == "drop":
        return finish([], SplitStats(dropped_overlong=1))
    cut = [Example(e.input_ids[: cfg.max_seq_len], e.labels[: cfg.max_seq_len]) for e in pair]
    for key, e in zip(("chosen", "rejected"), cut, strict=True):
        if e.n_loss == 0:
            raise UserError(
                f"{where}: the {key} completion starts after data.max_seq_len {cfg.max_seq_len} tokens, so "
                "truncation removes all of it; raise data.max_seq_len, shorten the prompt, or set "
                "data.overlong: drop"
            )
    if cut[0].input_ids == cut[1].input_ids:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' differ only after data.max_seq_len {cfg.max_seq_len} tokens, "
            "so truncation leaves the same sequence twice and the pair prefers nothing; raise "
            "data.max_seq_len, shorten the prompt, or set data.overlong: drop"
        )
    return finish(cut, SplitStats(truncated=1))


def scores(model: Model, batch: Batch) -> torch.Tensor:
    """A sequence head's output per row, fp32 [rows, num_labels] (pooled at each row's last non-pad token)."""
    return model(**batch.model_inputs(model.device), use_cache=False).logits.float()
