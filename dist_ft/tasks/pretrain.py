"""Continued pretraining: loss on every token. Raw text is split into `max_seq_len` chunks (EOS appended);
chat records are rendered with the template and trained on as plain text."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import DataConfig
from ..data.chat import Example, tokenize_conversation, tokenize_text
from ..data.formats import to_conversation
from ..data.shards.manifest import SplitStats
from . import Task, _lm
from ._shared import finish

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def examples(
    rec: dict, where: str, cfg: DataConfig, tok: PreTrainedTokenizerBase
) -> tuple[list[Example], SplitStats]:
    conv = to_conversation(rec, cfg.format, where)
    if conv.text is not None:
        return finish(tokenize_text(tok, conv.text, cfg.max_seq_len))
    ex = tokenize_conversation(tok, conv, where)
    return finish(*_lm.fit(Example(ex.input_ids, list(ex.input_ids)), cfg))


TASK = Task(
    name="pretrain",
    auto_class="AutoModelForCausalLM",
    examples=examples,
    collate=_lm.collate,
    loss=_lm.loss,
    eval_metrics=_lm.eval_metrics,
)
