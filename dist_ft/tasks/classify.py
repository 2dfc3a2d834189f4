"""Text classification with a sequence head (`AutoModelForSequenceClassification`, e.g. GPT-2's sentiment
example): records `{text, label}` or `{messages, label}` (rendered with the chat template), one sequence per
row; the head pools the last non-pad token. The label set is collected from the training source when the
shards are prepared (sorted; saved in the manifest and as the model's `id2label` / `label2id`). A label is
stored after its example's tokens as one extra position that only carries the class id, so shards need no
other format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..contracts import Batch
from ..data.chat import IGNORE, Example
from ..data.formats import json_type, message_list
from ..data.packing import collate_padded
from ..data.shards.manifest import SplitStats
from ..errors import UserError
from . import Item, LossOut, Meta, MetricSums, Model, Task
from ._shared import as_examples, finish, scores

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase


def _label(rec: dict, where: str) -> str:
    if "label" not in rec:
        raise UserError(
            f"{where}: record lacks 'label' (keys: {', '.join(sorted(rec)) or 'none'}); give every record "
            "its class"
        )
    v = rec["label"]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        raise UserError(
            f"{where}: 'label' must be a non-empty string or an integer, got JSON {json_type(v)} "
            f"{str(v)[:40]}; give the class"
        )
    return str(v)


def scan(records: Iterable[tuple[str, dict]]) -> Meta:
    """The label set of the training records (`records`: (where, record) pairs): integers in numeric order,
    else sorted."""
    seen: dict[str, str] = {}
    for where, rec in records:
        seen.setdefault(_label(rec, where), where)
    labels = sorted(seen, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))
    if len(labels) < 2:
        first = next(iter(seen.values()), "data.train")
        raise UserError(
            f"{first.rsplit(':', 1)[0]}: every training record has label {labels[0]!r}; a classifier needs "
            "records of at least two classes"
            if labels
            else f"{first}: no labelled records"
        )
    return {"labels": labels}


def examples(
    rec: dict, where: str, cfg: DataConfig, tok: PreTrainedTokenizerBase, meta: Meta | None = None
) -> tuple[list[Example], SplitStats]:
    label = _label(rec, where)
    labels = (meta or {}).get("labels", [])
    if label not in labels:
        raise UserError(
            f"{where}: label {label!r} never occurs in the training data (labels: {', '.join(labels)}); fix "
            "the label or add training records of that class"
        )
    if "messages" in rec:
        msgs = message_list(rec["messages"], where, "messages", "role", "content", None)
        ids = list(
            cast("BatchEncoding", tok.apply_chat_template(msgs, tokenize=True, return_dict=True))["input_ids"]
        )
    elif isinstance(rec.get("text"), str) and rec["text"].strip():
        ids = tok(rec["text"], add_special_tokens=True)["input_ids"]
    else:
        raise UserError(
            f"{where}: a classification record needs a non-empty 'text' or 'messages' (keys: "
            f"{', '.join(sorted(rec))})"
        )
    stats = SplitStats()
    if len(ids) > cfg.max_seq_len - 1:
        if cfg.overlong == "drop":
            return finish([], SplitStats(dropped_overlong=1))
        stats = SplitStats(truncated=1)
        ids = ids[: cfg.max_seq_len - 1]
    k = labels.index(label)
    return finish([Example(ids + [k], [IGNORE] * len(ids) + [k])], stats)


def collate(items: Sequence[Item], seq_len: int, pad_id: int, packing: bool) -> Batch:
    """One sequence per row, right-padded (the head pools the last non-pad token); the class is the stored
    last position."""
    seqs = as_examples(items)
    b = collate_padded(
        [Example(ex.input_ids[:-1], [IGNORE] * (len(ex.input_ids) - 1)) for ex in seqs], pad_id
    )
    return replace(b, n_loss=len(seqs), extra={"classes": torch.tensor([ex.input_ids[-1] for ex in seqs])})


def loss(model: Model, batch: Batch, chunk: int) -> LossOut:
    """Cross-entropy summed over the rows; metric sums: correct rows, and per class (index = class id) the
    rows of that class (`true`), predicted as it (`pred`) and both (`tp`)."""
    logits = scores(model, batch)
    y = batch.extra["classes"].to(logits.device)
    keep = float(batch.n_loss > 0)  # a padding batch of evaluation counts nothing
    pred = logits.argmax(-1)
    classes = torch.arange(logits.shape[1], device=logits.device)
    is_true, is_pred = y[:, None] == classes, pred[:, None] == classes  # [rows, classes]
    metrics = {
        "accuracy": keep * (pred == y).double().sum(),
        "true": keep * is_true.double().sum(0),
        "pred": keep * is_pred.double().sum(0),
        "tp": keep * (is_true & is_pred).double().sum(0),
    }
    return LossOut(keep * F.cross_entropy(logits, y, reduction="sum"), metrics)


def eval_metrics(loss_sum: float, n: float, sums: MetricSums) -> dict[str, float]:
    true, pred, tp = (sums.per_class[k] for k in ("true", "pred", "tp"))
    f1 = [2 * tp[c] / (true[c] + pred[c]) for c in range(len(true)) if true[c] + pred[c] > 0]
    out = {
        "val_loss": loss_sum / max(n, 1),
        "val_accuracy": sums.scalar["accuracy"] / max(n, 1),
        "val_macro_f1": sum(f1) / max(1, len(f1)),
    }
    return {**out, **{f"val_count_{c}": int(t) for c, t in enumerate(true)}}


def head(meta: Meta) -> dict[str, Any]:
    labels = meta["labels"]
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {v: k for k, v in enumerate(labels)},
    }


TASK = Task(
    name="classify",
    auto_class="AutoModelForSequenceClassification",
    examples=examples,
    collate=collate,
    loss=loss,
    eval_metrics=eval_metrics,
    packable=False,
    scan=scan,
    head=head,
)
