"""Direct Preference Optimization: preference pairs (prompt, chosen, rejected) through the SFT chat template,
the policy's log-probs of both completions in one forward, against a reference's.

The reference is the starting model. Its per-completion log-probs are computed once before training
(`reference.py`, stored beside the shards under the reference's weight hash), so no second model is held; with
LoRA the reference is the same model with its adapters switched off. A pair's two sequences sit in one row
(packed rows hold whole pairs, 2 x data.max_seq_len wide, positions restarting per sequence) and are never
split across micro-batches or ranks. A batch's loss units are pairs. Dropout is off (as the reference had
none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config
from ..contracts import Batch
from ..data.packing import collate_packed, collate_padded
from ..loss import batch_sequence_logps
from . import Item, LossOut, MetricSums, Model, Task
from ._shared import as_rows, pair_examples

GROUP = 2  # chosen, rejected: consecutive in every row
METRICS = (
    "reward_chosen",
    "reward_rejected",
    "reward_accuracy",
    "reward_margin",
    "logp_chosen",
    "logp_rejected",
)


def collate(items: Sequence[Item], seq_len: int, pad_id: int, packing: bool) -> Batch:
    """Rows of whole pairs -> one batch: padded (a row per sequence) or packed (rows of GROUP x seq_len)."""
    rows = as_rows(items)
    seqs = [ex for row in rows for ex in row]
    b = collate_packed(rows, GROUP * seq_len, pad_id) if packing else collate_padded(seqs, pad_id)
    width, seq_id, k = b.input_ids.shape[1], [], 0
    for row in rows if packing else [[ex] for ex in seqs]:
        ids = []
        for ex in row:
            ids += [k] * len(ex.input_ids)
            k += 1
        seq_id.append(ids + [-1] * (width - len(ids)))
    extra = {"seq_of_loss": torch.tensor(seq_id).flatten().index_select(0, b.loss_index), "n_seq": len(seqs)}
    if all(ex.ref is not None for ex in seqs):
        extra["ref_logps"] = torch.tensor([ex.ref for ex in seqs], dtype=torch.float64)
    return replace(b, n_loss=len(seqs) // GROUP, extra=extra)


def _means(logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    seq = batch.extra["seq_of_loss"].to(logps.device)
    return logps / torch.bincount(seq, minlength=batch.extra["n_seq"]).clamp(min=1)


def loss(
    model: Model,
    batch: Batch,
    chunk: int,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    smoothing: float = 0.0,
    adapters: bool = False,
) -> LossOut:
    """Summed over the batch's pairs: sigmoid (DPO) or IPO loss of the policy-vs-reference log-ratio margin,
    and the sums of the rewards (beta x log-ratio), reward accuracy and margin, and the completions'
    log-probs."""
    # a padding batch of evaluation: the forward keeps ZeRO-3's gathers in step, nothing counts
    if batch.n_loss == 0:
        lp = batch_sequence_logps(model, batch)
        return LossOut(0.0 * lp.sum(), {k: lp.new_zeros(()) for k in METRICS})
    lp = batch_sequence_logps(model, batch)
    ref = batch.extra.get("ref_logps")
    if ref is not None:
        ref = ref.to(lp.device)
    elif adapters:  # LoRA / prefix: the reference is the same model with its adapters switched off
        peft_model: Any = getattr(model, "module", model)  # the engine's module, or the model itself
        with torch.no_grad(), peft_model.disable_adapter():
            ref = batch_sequence_logps(model, batch)
    else:
        raise RuntimeError("dpo: the batch carries no reference log-probs (the reference pass did not run)")
    pol, refs = (_means(lp, batch), _means(ref, batch)) if kind == "ipo" else (lp, ref)
    ratio_c, ratio_r = pol[0::2] - refs[0::2], pol[1::2] - refs[1::2]
    margin = ratio_c - ratio_r
    if kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
    rc, rr = beta * ratio_c.detach(), beta * ratio_r.detach()
    metrics = {
        "reward_chosen": rc.sum(),
        "reward_rejected": rr.sum(),
        "reward_accuracy": (rc > rr).double().sum(),
        "reward_margin": (rc - rr).sum(),
        "logp_chosen": lp[0::2].detach().sum(),
        "logp_rejected": lp[1::2].detach().sum(),
    }
    return LossOut(losses.sum(), metrics)


def eval_metrics(loss_sum: float, n: float, sums: MetricSums) -> dict[str, float]:
    n = max(n, 1)
    return {"val_loss": loss_sum / n, **{f"val_{k}": sums.scalar[k] / n for k in METRICS if k in sums.scalar}}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (modules, and attention that reads a float from its config): the reference was
    scored without it, so at step 1 policy and reference log-probs agree and the loss is ln 2."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0  # type: ignore[assignment]  # a float; torch stubs want Tensor | Module


def configure(task: Task, cfg: Config) -> Task:
    """Bound: the config's `dpo:` settings (task_settings/dpo.py), and whether the reference is the
    adapters-off model."""
    d, adapters = cfg.dpo, cfg.model.peft is not None
    return replace(
        task,
        loss=partial(loss, beta=d.beta, kind=d.loss, smoothing=d.label_smoothing, adapters=adapters),
        reference=not adapters,
    )


LN2 = math.log(2.0)  # the sigmoid loss at step 1, where policy == reference
TASK = Task(
    name="dpo",
    auto_class="AutoModelForCausalLM",
    examples=pair_examples,
    collate=collate,
    loss=loss,
    eval_metrics=eval_metrics,
    group=GROUP,
    reference=True,
    prepare_model=disable_dropout,
    configure=configure,
)
