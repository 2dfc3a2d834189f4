"""Use a trained model: load an exported directory, generate replies, score held-out conversations.

Shared by `dist-ft chat`, `dist-ft eval`, the demo and the sample prompts logged at the end of training,
so all of them render the same chat template and stop on the same end-of-turn token. Nothing here
imports the training side (engine, loop, checkpoints).
"""

from __future__ import annotations

import math
from pathlib import Path

from .adapters import is_prefix_tuned
from .config import DataConfig
from .data.chat import stop_token_ids
from .data.formats import to_conversation
from .data.sources import read_records
from .errors import UserError


def load(model_dir: str, trust_remote_code: bool = False, adapter: str | None = None):
    """(tokenizer, model in eval mode) of an exported model directory, or of a base model directory with an adapter
    (`adapter`: a PEFT adapter directory such as <output.dir>/final/adapter, whose tokenizer is used). An export of
    prefix tuning (which cannot merge) gets its own final/adapter applied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import ADAPTER_DIR, apply, needs_applying
    from .model import grow_embeddings

    if not Path(model_dir).is_dir() or not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model '{model_dir}': not an exported model directory (expected config.json inside, e.g. runs/demo/final)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{adapter}': not an adapter directory (expected adapter_config.json inside, e.g. runs/demo/final/adapter)")
    if adapter is None and needs_applying(Path(model_dir) / ADAPTER_DIR):
        adapter = str(Path(model_dir) / ADAPTER_DIR)
    tok_dir = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise UserError(f"--model '{model_dir}': tokenizer has no chat template; export it with dist-ft train (which saves one)")
    if adapter is not None:
        grow_embeddings(model, len(tok))  # the rows the run's tokenizer added, as training made them
        model.generation_config.eos_token_id = stop_token_ids(tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model = apply(model, adapter)
    return tok, model.eval()


def generate(tok, model, conversations: list[list[dict]], *, max_new_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 0.9, stream: bool = False) -> list[str]:
    """The assistant's next reply to each conversation (temperature 0: greedy). `stream` prints tokens as
    they come (one conversation)."""
    import torch
    from transformers import TextStreamer

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    stops = stop_token_ids(tok)
    # a prefix-tuned model enters its virtual tokens as a KV cache, which generate()'s own cache drops (peft 0.21 with
    # transformers 5: the answer would be the base model's); without the cache every token sees the prefix
    uncached = {"use_cache": False} if is_prefix_tuned(model) else {}
    replies = []
    for history in conversations:
        enc = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id,
                                 eos_token_id=stops, **sampling, **uncached)
        replies.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def reply(tok, model, history: list[dict], **gen) -> str:
    return generate(tok, model, [history], **gen)[0]


def score(tok, model, path: str, task: str = "sft", max_new_tokens: int = 32) -> dict:
    """Held-out evaluation: the task's loss (and perplexity) over the file and, for records with a `check`
    field, answer accuracy (the greedy answer contains the expected string, case-insensitive). `samples`
    holds (question, answer, correct) for every checked record."""
    import torch

    from . import tasks

    t = tasks.get(task)
    data_cfg = DataConfig(train=path, task=task, max_seq_len=1 << 30)  # evaluation keeps whole conversations
    model.eval()
    total, n, checks = 0.0, 0, []
    with torch.no_grad():
        for where, rec in read_records(data_cfg.train):
            examples, _ = t.examples(rec, where, data_cfg, tok)
            batch = t.collate(examples, data_cfg.max_seq_len, tok.pad_token_id, False)
            total += float(t.loss(model, batch, 0).sum)
            n += batch.n_loss
            if "check" in rec:
                checks.append((to_conversation(rec, "auto", where).messages[:-1], str(rec["check"])))
    answers = generate(tok, model, [p for p, _ in checks], max_new_tokens=max_new_tokens, temperature=0.0)
    samples = [(p[-1]["content"], a, want.lower() in a.lower()) for (p, want), a in zip(checks, answers)]
    hits = sum(ok for _, _, ok in samples)
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "accuracy": hits / len(samples) if samples else None,
            "checked": len(samples), "samples": samples}
