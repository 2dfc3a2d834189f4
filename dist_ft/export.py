"""Write the trained model in Hugging Face format (safetensors + config + generation config + tokenizer
with its chat template), atomically: `out/` either holds a complete model or the previous one. A
parameter-efficient run writes the merged model (merged on CPU in fp32 from a fresh base) plus `out/adapter/`
in PEFT format."""

from __future__ import annotations

import copy
from pathlib import Path

from . import fsio
from .data.chat import stop_token_ids


def save_hf(model, tok, state_dict: dict, out: Path, extra=None) -> Path:
    """`extra(tmp)`: writes more into the directory before it is published (the adapter)."""
    model.config.use_cache = True  # for generation after export; training ran without the KV cache
    gen = getattr(model, "generation_config", None)  # (a sequence-classification head has none)
    if gen is not None:
        stops = stop_token_ids(tok)  # generation (transformers, vLLM) stops at the template's end of turn
        gen.eos_token_id = stops[0] if len(stops) == 1 else stops
        gen.pad_token_id = tok.pad_token_id
    with fsio.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tok.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return out


def write_final(
    engine, cfg, tok, auto_class: str, out: Path, is_main: bool, base_sha256: str = ""
) -> str | None:
    """Every rank joins the gather of what was trained; rank 0 writes `out` and returns a note for the log
    (None elsewhere). An adapter run first checks that training left the frozen base as it found it."""
    if cfg.model.peft is None:
        state = engine.full_state_dict()
        if is_main:
            save_hf(engine.module, tok, state, out)
        return "" if is_main else None
    import torch

    from . import adapters
    from .engine import whole_params
    from .model import load_model

    now = adapters.fingerprint(whole_params(engine.module))
    if now != base_sha256:
        raise RuntimeError(
            f"the frozen base weights changed during training (sha256 {base_sha256[:12]} -> {now[:12]}): "
            "a bug, please report it"
        )
    trained = engine.trainable_fp32()  # the adapter, whole, fp32 master values
    if not is_main:
        return None
    conf = copy.deepcopy(engine.module.peft_config["default"])
    model, save_adapter = adapters.export(
        lambda: load_model(cfg.model, tok, torch.float32, auto_class, adapters=False), conf, trained
    )
    save_hf(model, tok, model.state_dict(), out, extra=lambda tmp: save_adapter(tmp, tok))
    what = "merged model" if cfg.model.peft.method == "lora" else "base model"
    return (
        f" ({what} + {out / adapters.ADAPTER_DIR}: {sum(v.numel() for v in trained.values()):,} trained "
        f"parameters; base weights unchanged, sha256 {now[:12]})"
    )
