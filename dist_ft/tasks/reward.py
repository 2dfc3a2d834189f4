"""Reward model: a one-output sequence head trained on preference pairs (the same records as DPO) with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin). A pair's two sequences are consecutive rows
of a batch (never split across micro-batches or ranks); the head pools each sequence's last non-pad token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from ..config import Config
from ..contracts import Batch
from ..data.packing import collate_padded
from . import Item, LossOut, MetricSums, Model, Task
from ._shared import as_examples, pair_examples, scores


def collate(items: Sequence[Item], seq_len: int, pad_id: int, packing: bool) -> Batch:
    seqs = as_examples(items)
    return replace(collate_padded(seqs, pad_id), n_loss=len(seqs) // 2)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


def loss(model: Model, batch: Batch, chunk: int, margin: float = 0.0) -> LossOut:
    r = scores(model, batch)[:, 0]
    keep = float(batch.n_loss > 0)  # a padding batch of evaluation counts nothing
    rc, rr = r[0::2], r[1::2]
    d = (rc - rr).detach().double()
    metrics = {
        "accuracy": keep * (d > 0).double().sum(),
        "margin": keep * d.sum(),
        "reward_chosen": keep * rc.detach().double().sum(),
        "reward_rejected": keep * rr.detach().double().sum(),
    }
    return LossOut(keep * bradley_terry(rc, rr, margin).sum(), metrics)


def eval_metrics(loss_sum: float, n: float, sums: MetricSums) -> dict[str, float]:
    n = max(n, 1)
    return {"val_loss": loss_sum / n, **{f"val_{k}": v / n for k, v in sums.scalar.items()}}


def configure(task: Task, cfg: Config) -> Task:
    """Bound: the config's `reward:` settings (task_settings/reward.py)."""
    return replace(task, loss=partial(loss, margin=cfg.reward.margin))


TASK = Task(
    name="reward",
    auto_class="AutoModelForSequenceClassification",
    examples=pair_examples,
    collate=collate,
    loss=loss,
    eval_metrics=eval_metrics,
    group=2,
    packable=False,
    head=lambda meta: {"num_labels": 1},
    configure=configure,
)
