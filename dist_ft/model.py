"""Load the model a task needs (hub id, local dir, `pkg://` dir, GGUF) for fine-tuning with a given tokenizer.

The model class comes from the task (`AutoModelForCausalLM` for SFT and pretraining). Embeddings are
resized when the tokenizer gained tokens (ChatML), and the pad id is set. Nothing here knows about data.
"""

from __future__ import annotations

import importlib.util

from . import hub
from .config import ModelConfig


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


def load_model(cfg: ModelConfig, tok, dtype=None, auto_class: str = "AutoModelForCausalLM"):
    """`auto_class`: the transformers Auto class the task's head needs."""
    import torch
    import transformers

    path, kw = hub.source(cfg)
    if cfg.attn_implementation:
        kw["attn_implementation"] = attn_implementation(cfg.attn_implementation)
    try:
        model = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype or torch.float32, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise hub.load_error(cfg, "model", e) from None
    if cfg.gguf_file:
        # transformers dequantizes GGUF tensors into ordinary float weights but keeps a GGUF "quantizer"
        # marker that blocks save_pretrained; the weights are plain tensors, so the marker is dropped.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    if model.get_input_embeddings().num_embeddings < len(tok):  # (weight.shape is empty under ZeRO-3)
        model.resize_token_embeddings(len(tok))  # new rows start at the mean embedding
    model.config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model
