"""Tiny local models for tests: a GPT-2 and a Llama, each saved with `save_pretrained` and loaded back
through the same `from_pretrained` path a hub id takes. Tokenizers are byte-level BPE trained here."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

WORDS = (
    "the a of to and is in it you that he was for on are with as his they be at one have this from or had by "
    "what when where who how why which color capital number hello world assistant user system answer question "
    "red green blue yellow black white apple banana cherry paris rome london tokyo one two three four five six "
    "seven eight nine ten yes no please thanks good bad cat dog bird fish tree river mountain city country"
).split()


def corpus() -> list[str]:
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
    lines += [
        "What color is the apple? The apple is red.",
        "Hello! How are you? I am fine, thanks.",
        '<|user|> <|assistant|> </s> {"role": "user"}',
    ]
    return lines


def train_tokenizer(
    out: Path,
    *,
    eos: str | None = "<|endoftext|>",
    extra_special: tuple[str, ...] = (),
    vocab_size: int = 600,
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ([eos] if eos else []) + list(extra_special)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=eos, unk_token=None)
    fast.save_pretrained(out)
    return fast


def make_gpt2(
    out: Path, *, n_layer: int = 2, n_embd: int = 64, n_positions: int = 512, dropout: float = 0.0
) -> Path:
    """GPT-2-shaped base model: no chat template, no pad token (like the real gpt2). With `dropout`, training
    draws random masks, so an exact resume needs the RNG states restored too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(out)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


ZEPHYR_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def make_llama(out: Path) -> Path:
    """Llama-style model whose own chat template has no {% generation %} markers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(out, eos="</s>", extra_special=("<|user|>", "<|assistant|>", "<|system|>"))
    tok.chat_template = ZEPHYR_TEMPLATE
    tok.pad_token = None
    tok.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


COLORS = {
    "apple": "red",
    "banana": "yellow",
    "cherry": "red",
    "river": "blue",
    "tree": "green",
    "cat": "black",
    "dog": "white",
    "bird": "blue",
}


def toy_chat(n: int = 64) -> list[dict]:
    """A learnable toy task: the color of things, in OpenAI messages format."""
    items = list(COLORS.items())
    recs = []
    for i in range(n):
        thing, color = items[i % len(items)]
        msgs = [
            {"role": "user", "content": f"What color is the {thing}?"},
            {"role": "assistant", "content": f"The {thing} is {color}."},
        ]
        if i % 4 == 0:
            msgs = [{"role": "system", "content": "Answer briefly."}] + msgs
        recs.append({"messages": msgs})
    return recs


@contextmanager
def weights_changed_on_disk(
    model_dir: Path, name: str = "transformer.h.0.mlp.c_fc.weight", delta: float = 1e-3
):
    """Inside the block, `model_dir`'s safetensors has `name` moved by `delta` (the model changed under a run); restored after."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    original = weights.read_bytes()
    w = load_file(weights)
    w[name] = w[name] + delta
    save_file(w, weights, metadata={"format": "pt"})
    try:
        yield
    finally:
        weights.write_bytes(original)


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def run_config(tmp: Path, model: Path, records: int, train: str, engine: str, extra: str = "") -> Path:
    """tmp/cfg.yaml training `model` on `records` toy conversations (tmp/train.jsonl), 128-token rows.
    `train` / `engine` are the YAML flow mappings' insides, e.g. "max_steps: 8, micro_batch_size: 2"."""
    data = write_jsonl(tmp / "train.jsonl", toy_chat(records))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\ndata: {{train: {data}, max_seq_len: 128}}\n"
        f"train: {{{train}}}\nengine: {{{engine}}}\n{extra}"
    )
    return cfg


def losses(out: Path) -> list[float]:
    """The per-step training losses of a run directory, at the full precision metrics.jsonl keeps."""
    from dist_ft.track import read_steps

    return [s.loss for s in read_steps(out / "metrics.jsonl")]


def wandb_run_ids(out: Path) -> list[str]:
    """Ids of the offline W&B runs written under out/wandb (dirs are offline-run-<time>-<id>), oldest first."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((out / "wandb").glob("offline-run-*"))]


WRONG = {
    "red": "green",
    "yellow": "blue",
    "blue": "yellow",
    "green": "red",
    "black": "white",
    "white": "black",
}
OTHER_WRONG = {
    "red": "black",
    "yellow": "white",
    "blue": "red",
    "green": "yellow",
    "black": "blue",
    "white": "green",
}  # unseen in WRONG pairs


def toy_pairs(n: int = 64, question: str = "What color is the {}?", wrong: dict = WRONG) -> list[dict]:
    """Preference pairs on the toy colors (the right color chosen, a `wrong` one rejected), in the three record shapes."""
    items = list(COLORS.items())
    recs = []
    for i in range(n):
        thing, color = items[i % len(items)]
        q, good, bad = question.format(thing), f"The {thing} is {color}.", f"The {thing} is {wrong[color]}."
        shape = i % 3
        if shape == 0:
            recs.append({"prompt": q, "chosen": good, "rejected": bad})
        elif shape == 1:
            recs.append(
                {
                    "conversations": [{"from": "human", "value": q}],
                    "chosen": {"from": "gpt", "value": good},
                    "rejected": bad,
                }
            )
        else:
            recs.append(
                {
                    "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                    "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
                }
            )
    return recs
