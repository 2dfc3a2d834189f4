"""Supervised fine-tuning for chat: loss on the assistant turns (and their end-of-turn token) only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import DataConfig
from ..data.chat import Example, tokenize_conversation
from ..data.formats import to_conversation
from ..data.shards.manifest import SplitStats
from ..errors import UserError
from . import Task, _lm
from ._shared import finish

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def examples(
    rec: dict, where: str, cfg: DataConfig, tok: PreTrainedTokenizerBase
) -> tuple[list[Example], SplitStats]:
    conv = to_conversation(rec, cfg.format, where)
    if conv.text is not None:
        raise UserError(
            f"{where}: raw 'text' record in an SFT run; set data.task: pretrain for continued pretraining, "
            "or use chat records"
        )
    return finish(*_lm.fit(tokenize_conversation(tok, conv, where, cfg.train_on), cfg))


TASK = Task(
    name="sft",
    auto_class="AutoModelForCausalLM",
    examples=examples,
    collate=_lm.collate,
    loss=_lm.loss,
    eval_metrics=_lm.eval_metrics,
)
