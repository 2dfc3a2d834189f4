"""Supervised fine-tuning for chat: loss on the assistant turns (and their end-of-turn token) only."""

from __future__ import annotations

from ..data.chat import tokenize_conversation
from ..data.formats import to_conversation
from ..errors import UserError
from . import Task, _lm


def examples(rec: dict, where: str, cfg, tok):
    counts = _lm.counters()
    conv = to_conversation(rec, cfg.format, where)
    if conv.text is not None:
        raise UserError(f"{where}: raw 'text' record in an SFT run; set data.task: pretrain for continued pretraining, or use chat records")
    return _lm.finish(_lm.fit(tokenize_conversation(tok, conv, where), cfg, counts), counts)


TASK = Task(name="sft", auto_class="AutoModelForCausalLM", examples=examples, collate=_lm.collate, loss=_lm.loss,
            eval_metrics=_lm.eval_metrics)
