"""Write the trained model in Hugging Face format (safetensors + config + generation config + tokenizer with
its chat template), atomically: `out/` either holds a complete model or the previous one."""

from __future__ import annotations

from pathlib import Path

from . import fsio
from .data.chat import stop_token_ids


def save_hf(model, tok, state_dict: dict, out: Path) -> Path:
    model.config.use_cache = True  # for generation after export; training ran without the KV cache
    stops = stop_token_ids(tok)  # generation (transformers, vLLM) stops at the template's end of turn
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tok.pad_token_id
    with fsio.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
