"""Load the model a task needs (hub id, local dir, `pkg://` dir, GGUF) for fine-tuning with a given
tokenizer.

The model class comes from the task (`AutoModelForCausalLM` for SFT and pretraining). Embeddings are
resized when the tokenizer gained tokens (ChatML), and the pad id is set. Nothing here knows about data.
"""

from __future__ import annotations

import contextlib
import importlib.util

from . import hub
from .config import ModelConfig
from .errors import UserError

POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def _require_flash_attn() -> None:
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
            "installed; pip install flash-attn --no-build-isolation (on a CUDA machine), or set "
            "model.attn_implementation: sdpa"
        )


def attn_implementation(requested: str) -> str:
    """`flash_attention_2` needs the flash-attn package (refused without it); it runs on a CUDA GPU (packed
    rows then take its varlen path, from the restarting position_ids), elsewhere sdpa is used, said once on
    stderr."""
    import torch

    if requested != "flash_attention_2":
        return requested
    _require_flash_attn()
    if not torch.cuda.is_available():
        import sys

        print(
            "note: model.attn_implementation: flash_attention_2 is unavailable (there is no CUDA GPU); "
            "using sdpa",
            file=sys.stderr,
        )
        return "sdpa"
    return requested


def preflight(cfg: ModelConfig, max_seq_len: int) -> None:
    """What a run needs of its model, checked from its config before anything loads: the attention kernel is
    installed, config.json reads, and `data.max_seq_len` is within the model's positions."""
    from transformers import AutoConfig

    if cfg.attn_implementation == "flash_attention_2":
        _require_flash_attn()
    path, kw = hub.source(cfg)
    if cfg.gguf_file:  # its config lives in the GGUF file, which takes seconds to read: not checked ahead
        return
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, JSON errors: a damaged or unreachable model
        raise hub.load_error(cfg, "model config", e) from None
    key = next((k for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    if key is not None and max_seq_len > getattr(config, key):
        n = getattr(config, key)
        raise UserError(
            f"data.max_seq_len {max_seq_len} is above the model's {key} {n} (model.path '{cfg.path}'), so "
            f"rows would run past its last position; set data.max_seq_len to {n} or less"
        )


def load_model(
    cfg: ModelConfig,
    tok,
    dtype=None,
    auto_class: str = "AutoModelForCausalLM",
    adapters: bool = True,
    init=contextlib.nullcontext,
    gather=lambda *params: contextlib.nullcontext(),
    head: dict | None = None,
):
    """`auto_class`: the transformers Auto class the task's head needs. With `model.peft`, the model comes
    wrapped in fresh adapters (`adapters=False`: the bare base, e.g. for the export's merge). `init()`: the
    context the base is built in (ZeRO-3: partitioned as it loads); the adapters are added after it, with
    `gather(params)` making the embedding whole while peft copies the new tokens' rows. `head`: the task's
    head settings (e.g. num_labels, id2label)."""
    with init():
        model, had = _load_base(cfg, tok, dtype, auto_class, head or {})
    if cfg.peft is not None and adapters:
        from . import adapters as peft_adapters

        with gather(model.get_input_embeddings().weight):
            model = peft_adapters.wrap(model, cfg.peft, new_tokens(had, len(tok)), auto_class)
    return model


def _load_base(cfg: ModelConfig, tok, dtype, auto_class: str, head: dict):
    import torch
    import transformers
    from safetensors import SafetensorError

    path, kw = hub.source(cfg)
    kw.update(head)
    if cfg.attn_implementation:
        kw["attn_implementation"] = attn_implementation(cfg.attn_implementation)
    try:
        model = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype or torch.float32, **kw)
    except (OSError, ValueError, SafetensorError) as e:  # a missing, damaged or truncated file of the model
        raise hub.load_error(cfg, "model", e) from None
    if cfg.gguf_file:
        # transformers dequantizes GGUF tensors into ordinary float weights but keeps a GGUF "quantizer"
        # marker that blocks save_pretrained; the weights are plain tensors, so the marker is dropped.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    had = grow_embeddings(model, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, had


def grow_embeddings(model, n: int) -> int:
    """Give `model` rows for `n` tokens where it has fewer (the tokenizer gained ChatML markers); returns how
    many it had. New rows are drawn around the mean embedding, the same draw on every load (a resume, the
    export's fresh base, an adapter applied at inference) whatever the run did with the RNG before."""
    from .adapters import fixed_draws

    had = model.get_input_embeddings().num_embeddings  # (weight.shape is empty under ZeRO-3)
    if had < n:
        with fixed_draws(0):  # and the run's own RNG states (train.seed: GPU dropout) are left as they were
            model.resize_token_embeddings(n)
    return had


def new_tokens(had: int, now: int) -> list[int]:
    """Token ids whose embedding rows the resize created (an adapter trains them: they start random)."""
    return list(range(had, now)) if now > had else []
