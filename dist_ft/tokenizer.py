"""Load the run's tokenizer, ready for chat fine-tuning: a fast tokenizer, a chat template, a pad token.

Base models without a chat template (or `model.chat_template: chatml`) get our ChatML template
(`data/chat.py`, with `{% generation %}` markers) and its special tokens; the model's embeddings are
resized to match when it loads. The template travels with the exported tokenizer.
"""

from __future__ import annotations

from . import hub
from .config import ModelConfig
from .data.chat import install_chatml
from .errors import UserError


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path, kw = hub.source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise hub.load_error(cfg, "tokenizer", e) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"model.path '{cfg.path}': a fast (Rust) tokenizer is required for assistant-token masks; install `tokenizers` or convert the tokenizer")
    if cfg.chat_template == "chatml" or not tok.chat_template:
        install_chatml(tok)
    if tok.pad_token is None:
        # padding positions never carry loss, so reusing EOS is safe; only add a token when there is none
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok
