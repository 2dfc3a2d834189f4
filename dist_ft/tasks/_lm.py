"""Pieces shared by the token-level language-modelling tasks (sft, pretrain): fitting an example into
`max_seq_len`, collating, the summed next-token loss, and loss/perplexity for evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import DataConfig
from ..contracts import Batch
from ..data.chat import Example
from ..data.packing import collate_packed, collate_padded
from ..data.shards.manifest import SplitStats
from ..loss import token_loss_sum
from . import Item, LossOut, MetricSums, Model
from ._shared import as_examples, as_rows


def fit(ex: Example, cfg: DataConfig) -> tuple[list[Example], SplitStats]:
    """An example longer than data.max_seq_len is truncated or dropped (data.overlong), and counted."""
    if len(ex.input_ids) <= cfg.max_seq_len:
        return [ex], SplitStats()
    if cfg.overlong == "drop":
        return [], SplitStats(dropped_overlong=1)
    ex = Example(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
    if ex.n_loss == 0:
        return [], SplitStats(truncated=1, dropped_no_loss_after_truncation=1)
    return [ex], SplitStats(truncated=1)


def collate(items: Sequence[Item], seq_len: int, pad_id: int, packing: bool) -> Batch:
    return (
        collate_packed(as_rows(items), seq_len, pad_id)
        if packing
        else collate_padded(as_examples(items), pad_id)
    )


def loss(model: Model, batch: Batch, chunk: int) -> LossOut:
    return LossOut(token_loss_sum(model, batch, chunk))


def eval_metrics(loss_sum: float, n: float, sums: MetricSums) -> dict[str, float]:
    loss = loss_sum / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
