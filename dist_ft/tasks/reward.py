"""Reward model: a one-output sequence head trained on preference pairs (the same records as DPO) with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin). A pair's two sequences are consecutive rows of a
batch (never split across micro-batches or ranks); the head pools each sequence's last non-pad token."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch.nn.functional as F

from ..contracts import Batch
from ..data.packing import collate_padded
from . import LossOut, Task
from .classify import scores
from .dpo import examples as pair_examples


def examples(rec: dict, where: str, cfg, tok):
    """The DPO task's checked chosen / rejected sequences (prompt + completion through the chat template)."""
    return pair_examples(rec, where, cfg, tok)


def collate(items: list, seq_len: int, pad_id: int, packing: bool) -> Batch:
    seqs = [ex for row in items for ex in row]
    return replace(collate_padded(seqs, pad_id), n_loss=len(seqs) // 2)


def bradley_terry(chosen, rejected, margin: float = 0.0):
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


def loss(model, batch: Batch, chunk: int, margin: float = 0.0) -> LossOut:
    r = scores(model, batch)[:, 0]
    keep = float(batch.n_loss > 0)  # a padding batch of evaluation counts nothing
    rc, rr = r[0::2], r[1::2]
    d = (rc - rr).detach().double()
    metrics = {"accuracy": keep * (d > 0).double().sum(), "margin": keep * d.sum(),
               "reward_chosen": keep * rc.detach().double().sum(), "reward_rejected": keep * rr.detach().double().sum()}
    return LossOut(keep * bradley_terry(rc, rr, margin).sum(), metrics)


def eval_metrics(loss_sum: float, n: float, sums: dict) -> dict:
    n = max(n, 1)
    return {"val_loss": loss_sum / n, **{f"val_{k}": v / n for k, v in sums.items()}}


def configure(task: Task, cfg) -> Task:
    return replace(task, loss=partial(loss, margin=cfg.reward.margin))


TASK = Task(name="reward", auto_class="AutoModelForSequenceClassification", examples=examples, collate=collate, loss=loss,
            eval_metrics=eval_metrics, group=2, packable=False, head=lambda meta: {"num_labels": 1}, configure=configure)
