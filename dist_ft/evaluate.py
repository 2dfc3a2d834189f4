"""Held-out evaluation of a model: assistant-token loss/perplexity and, for records with a `check`
field, answer accuracy (greedy answer contains the expected string, case-insensitive).
`samples` holds (question, answer, correct) for every checked record."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SourceConfig
from .data.chat import tokenize_conversation
from .data.formats import to_conversation
from .data.packing import collate_padded
from .data.sources import read_records


def score(tok, model, path: str, max_new_tokens: int = 32) -> dict:
    records = read_records(SourceConfig(path=path))
    model.eval()
    total, n, hits, checked, samples = 0.0, 0, 0, 0, []
    with torch.no_grad():
        for where, rec in records:
            conv = to_conversation(rec, "auto", where)
            batch = collate_padded([tokenize_conversation(tok, conv, where)], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            total += F.cross_entropy(logits[0].float(), batch["targets"][0], ignore_index=-100, reduction="sum").item()
            n += batch["n_loss"]
            if "check" in rec:
                prompt = conv.messages[:-1]
                enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                ok = str(rec["check"]).lower() in answer.lower()
                hits += ok
                checked += 1
                samples.append((prompt[-1]["content"], answer, ok))
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "accuracy": hits / checked if checked else None,
            "checked": checked, "samples": samples}
