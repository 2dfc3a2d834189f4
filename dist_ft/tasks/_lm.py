"""Pieces shared by the token-level language-modelling tasks (sft, pretrain): fitting an example into
`max_seq_len`, collating, the summed next-token loss, and loss/perplexity for evaluation."""

from __future__ import annotations

import math

from ..contracts import Batch
from ..data.chat import Example
from ..data.packing import collate_packed, collate_padded
from ..data.shards import COUNTERS
from ..loss import token_loss_sum
from . import LossOut



def counters() -> dict:
    counts = dict.fromkeys(COUNTERS, 0)
    counts["records"] = 1
    return counts


def fit(ex: Example, cfg, counts: dict) -> list[Example]:
    """An example longer than data.max_seq_len is truncated or dropped (data.overlong), and counted."""
    if len(ex.input_ids) <= cfg.max_seq_len:
        return [ex]
    if cfg.overlong == "drop":
        counts["dropped_overlong"] = 1
        return []
    ex = Example(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
    counts["truncated"] = 1
    if ex.n_loss == 0:
        counts["dropped_no_loss_after_truncation"] = 1
        return []
    return [ex]


def finish(examples: list[Example], counts: dict) -> tuple[list[Example], dict]:
    counts["examples"] = len(examples)
    counts["tokens"] = sum(len(e.input_ids) for e in examples)
    counts["loss_tokens"] = sum(e.n_loss for e in examples)
    return examples, counts


def collate(items: list, seq_len: int, pad_id: int, packing: bool) -> Batch:
    return collate_packed(items, seq_len, pad_id) if packing else collate_padded(items, pad_id)


def loss(model, batch: Batch, chunk: int) -> LossOut:
    return LossOut(token_loss_sum(model, batch, chunk))


def eval_metrics(loss_sum: float, n: float, sums: dict) -> dict:
    loss = loss_sum / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
