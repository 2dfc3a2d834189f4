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
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, the tokenizers library's bare Exception
        raise hub.load_error(cfg, "tokenizer", e) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(
            f"model.path '{cfg.path}': a fast (Rust) tokenizer is required for assistant-token masks; "
            "install `tokenizers` or convert the tokenizer"
        )
    if cfg.chat_template == "chatml" or not tok.chat_template:
        install_chatml(tok)
    elif isinstance(tok.chat_template, dict):
        _named_templates(cfg, tok.chat_template)
    if tok.pad_token is None:
        # padding positions never carry loss, so reusing EOS is safe; only add a token when there is none
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def _named_templates(cfg: ModelConfig, templates: dict) -> None:
    """A tokenizer with several named chat templates renders with the one named `default` (as transformers
    does); all are kept in the export. Without a default it is unclear which one to learn, so that is
    refused."""
    import sys

    others = ", ".join(sorted(n for n in templates if n != "default"))
    if "default" not in templates:
        raise UserError(
            f"model.path '{cfg.path}': the tokenizer has several named chat templates ({others}) and none "
            "named 'default', so which to train with is unclear; name one 'default' in "
            "tokenizer_config.json, or set model.chat_template: chatml"
        )
    print(
        f"note: model.path '{cfg.path}': training with the chat template named 'default'; the others "
        f"({others}) are kept in the export, unused here",
        file=sys.stderr,
    )
