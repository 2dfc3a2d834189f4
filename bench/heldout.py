"""Held-out figures for bench/precision.py, computed the same way for every framework's trained model: records
tokenized by dist_ft's own pipeline (chat template, assistant-only labels), an fp32 forward pass, no dropout.

- SFT: mean cross-entropy per assistant token over the held-out conversations;
- DPO: the DPO loss (sigmoid, beta) and reward accuracy (chosen's implicit reward above rejected's) over held-out
  pairs, against the starting model as reference."""

from __future__ import annotations

import torch


def _seq_logps(model, examples, batch: int = 16) -> tuple[list[float], list[int]]:
    """Per example: the summed log-prob of its labelled tokens and how many there are (right-padded batches, fp32)."""
    from dist_ft.data.chat import IGNORE

    sums, counts = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i : i + batch]
            width = max(len(e.input_ids) for e in part)
            ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in part])
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in part])
            labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in part])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
            tgt = labels[:, 1:]
            keep = tgt != IGNORE
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            sums += lp.sum(1).double().tolist()
            counts += keep.sum(1).tolist()
    return sums, counts


def sft_examples(tok, records: list[dict]):
    from dist_ft.data.chat import tokenize_conversation
    from dist_ft.data.formats import to_conversation

    return [
        tokenize_conversation(tok, to_conversation(r, "messages", f"held-out {i}"), f"held-out {i}")
        for i, r in enumerate(records)
    ]


def pair_examples(tok, records: list[dict]):
    from dist_ft.data.preference import to_pair, tokenize_pair

    out = []
    for i, r in enumerate(records):
        out += tokenize_pair(tok, to_pair(r, f"held-out {i}"), f"held-out {i}")
    return out  # chosen, rejected, chosen, rejected, ...


def sft_loss(model, examples) -> dict:
    sums, counts = _seq_logps(model, examples)
    return {"heldout_loss": -sum(sums) / sum(counts)}


def dpo_figures(model, examples, ref_logps: list[float], beta: float) -> dict:
    logps, _ = _seq_logps(model, examples)
    margins = [
        beta * ((logps[i] - ref_logps[i]) - (logps[i + 1] - ref_logps[i + 1]))
        for i in range(0, len(logps), 2)
    ]
    loss = [float(-torch.nn.functional.logsigmoid(torch.tensor(m, dtype=torch.float64))) for m in margins]
    return {
        "heldout_loss": sum(loss) / len(loss),
        "heldout_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
    }


def reference_logps(model_dir: str, examples) -> list[float]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = _seq_logps(ref, examples)[0]
    del ref
    return out
