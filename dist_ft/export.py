"""Write the trained model in Hugging Face format (safetensors + config + tokenizer + chat template), atomically."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_hf(model, tok, state_dict: dict, out: Path) -> Path:
    """Write into `<out>.tmp/` then rename, so `out/` either holds a complete model or does not exist."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # for generation after export; training ran without the KV cache
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
