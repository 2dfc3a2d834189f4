"""Evaluation: one loop for every place that measures a model on held-out data.

- `validation`: training's periodic eval (the engine over the run's validation rows, every rank its slice).
- `score` (a chat / language model on a file), `score_pairs` (preference pairs), `score_heads` (a
  classifier or reward model): `dist-ft eval` and the demo, on a loaded export (`inference.load`).
- `fmt_score` / `fmt_pairs` / `fmt_heads`: the one-line summaries they print.
All of them run batches through `_forward` (eval mode, no gradients); the task's loss and metric sums are
added up by `loss_sums` / `add_sums`, which training's step uses too. Nothing here imports the training side
(engine, loop, checkpoints): the engine is passed in and called like a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from .config import DataConfig
from .data.formats import to_conversation
from .data.sources import iter_records, read_records
from .inference import generate

# max_seq_len for scoring a file: a length no record reaches, so every conversation (pair, text) is scored
# whole, never truncated or dropped as training's data.max_seq_len would
# (collate pads to the longest row, not to this)
WHOLE_SEQ_LEN = 1 << 30


def add_sums(sums: dict, values: dict) -> None:
    """Add one batch's sums (tensors on the device: no host sync) to the running float64 totals in `sums`."""
    import torch

    for k, v in values.items():
        sums[k] = sums[k] + v.detach() if k in sums else v.detach().to(torch.float64)


def _forward(model, batches: Iterable, fn: Callable) -> list:
    """`fn(batch)` for each of `batches` (built one at a time as they are consumed), with the model in eval
    mode and no gradients recorded."""
    import torch

    model.eval()
    with torch.no_grad():
        return [fn(batch) for batch in batches]


def loss_sums(model, task, batches: Iterable, chunk: int = 0) -> tuple:
    """(loss sum, loss units, metric sums) of the task over `batches`: the sums are float64 tensors left on
    the model's device (0.0 for no batches), the units an int."""

    def scored(batch):
        if task.rollout is not None:  # an online task samples what it scores
            batch = task.rollout(model, [batch])[0]
        return task.loss(model, batch, chunk), batch.n_loss

    outs = _forward(model, batches, scored)
    total: dict[str, Any] = {}
    sums: dict[str, Any] = {}
    for out, _ in outs:
        add_sums(total, {"loss": out.sum})
        add_sums(sums, out.metrics)
    return total.get("loss", 0.0), sum(n for _, n in outs), sums


def validation(engine, task, prep, cfg, env) -> dict:
    """The task's eval metrics over the run's validation rows, every rank scoring its slice
    (summed over the ranks); a mixture's validation sources also each their own `val_loss_<name>`."""
    from . import dist, sequence_parallel
    from .data import dataset
    from .tasks import MetricSums

    # (sequence parallelism: the ranks of a group score the same rows, each its shard of them)
    reader, readers = sequence_parallel.readers(env.rank, env.world_size, cfg.engine.sequence_parallel)
    items = prep.val.items
    parts = prep.val_parts or [("", 0, len(items))]
    per: list = []
    sums: dict = {}
    for _, a, b in parts:
        batches = dataset.eval_batches(prep, cfg.train.micro_batch_size, reader, readers, items[a:b])
        total, n, part_sums = loss_sums(engine, task, batches, cfg.engine.loss_chunk_tokens)
        per += [total, n]
        add_sums(sums, part_sums)
    engine.train()
    flat = dist.all_sum(*per, *MetricSums.elements(sums))
    per, totals = flat[: len(per)], flat[len(per) :]
    out = task.eval_metrics(sum(per[0::2]), sum(per[1::2]), MetricSums.read(sums, totals))
    if prep.val_parts:
        for i, (name, _, _) in enumerate(parts):
            out[f"val_loss_{name}"] = per[2 * i] / max(per[2 * i + 1], 1)
    return out


def _records(cfg: DataConfig) -> list[tuple[str, dict]]:
    """The records of the file a scoring config is built on (`DataConfig(train=path)`)."""
    src = cfg.source("train")
    assert src is not None  # (set from the path)
    return read_records(src)


def _checked(tok, model, checks: list, max_new_tokens: int) -> list:
    """(question, greedy answer, whether it contains the expected string, case-insensitive)
    for each (prompt, expected)."""
    answers = generate(
        tok, model, [p for p, _ in checks], max_new_tokens=max_new_tokens, temperature=0.0, progress=True
    )
    return [
        (p[-1]["content"], a, want.lower() in a.lower()) for (p, want), a in zip(checks, answers, strict=True)
    ]


def _tool_checked(tok, model, checks: list, max_new_tokens: int) -> list:
    """(question, greedy reply, whether its tool calls are exactly the expected ones: names and arguments, in
    order) for each (prompt, tools, expected calls); conversations offered the same tools generate
    together."""
    import json

    from .data.tools import parse_calls

    groups: dict[str, list[int]] = {}
    for i, (_, tools, _) in enumerate(checks):
        groups.setdefault(json.dumps(tools, sort_keys=True), []).append(i)
    replies: dict[int, str] = {}
    for idx in groups.values():
        out = generate(
            tok,
            model,
            [checks[i][0] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            tools=checks[idx[0]][1],
        )
        replies.update(zip(idx, out, strict=True))
    samples = []
    for i, (prompt, _, want) in enumerate(checks):
        _, calls = parse_calls(replies[i])
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        wanted = [(c["function"]["name"], c["function"]["arguments"]) for c in want]
        samples.append((prompt[-1]["content"], replies[i], got == wanted))
    return samples


def score(tok, model, path: str, task: str = "sft", max_new_tokens: int = 32) -> dict:
    """Held-out evaluation: the task's loss (and perplexity) over the file and, for records with a `check`
    field, answer accuracy (the greedy answer contains the expected string, case-insensitive); for records
    with `tools` whose last assistant turn calls tools, tool-call accuracy (the greedy reply's calls are
    exactly those). `samples` / `tool_samples` hold (question, answer, correct) for every checked record."""
    from . import tasks

    t = tasks.get(task)
    data_cfg = DataConfig(train=path, task=task, max_seq_len=WHOLE_SEQ_LEN)
    checks, tool_checks = [], []

    def batches():  # one per record
        for where, rec in _records(data_cfg):
            examples, _ = t.examples(rec, where, data_cfg, tok)
            yield t.collate(examples, data_cfg.max_seq_len, tok.pad_token_id, False)
            if "check" not in rec and "tools" not in rec:
                continue  # (nothing to generate for: its loss is all it is scored on)
            conv = to_conversation(rec, "auto", where)
            if "check" in rec:
                checks.append((conv.messages[:-1], str(rec["check"])))
            last = max((i for i, m in enumerate(conv.messages) if m["role"] == "assistant"), default=0)
            if conv.tools and conv.messages[last].get("tool_calls"):
                tool_checks.append((conv.messages[:last], conv.tools, conv.messages[last]["tool_calls"]))

    total, n, _ = loss_sums(model, t, batches())
    samples = _checked(tok, model, checks, max_new_tokens)
    tool_samples = _tool_checked(tok, model, tool_checks, max(max_new_tokens, 96))
    loss = float(total) / max(n, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "accuracy": sum(ok for *_, ok in samples) / len(samples) if samples else None,
        "checked": len(samples),
        "samples": samples,
        "tool_accuracy": sum(ok for *_, ok in tool_samples) / len(tool_samples) if tool_samples else None,
        "tool_samples": tool_samples,
    }


def score_pairs(tok, model, path: str, max_new_tokens: int = 48) -> dict:
    """Preference pairs of a file under `model`: each pair's summed completion log-probs (chosen, rejected),
    and for pairs with a `check` field the greedy answer to the prompt and whether it contains the checked
    string."""
    from . import tasks
    from .data.preference import to_pair, tokenize_pair
    from .loss import batch_sequence_logps

    dpo = tasks.get("dpo")
    checks = []

    def batches():  # one pair each
        for where, rec in _records(DataConfig(train=path, task="dpo")):
            pair = to_pair(rec, where)
            yield dpo.collate([list(tokenize_pair(tok, pair, where))], WHOLE_SEQ_LEN, tok.pad_token_id, False)
            if "check" in rec:
                checks.append((pair.prompt, str(rec["check"])))

    logps = _forward(model, batches(), lambda batch: batch_sequence_logps(model, batch).tolist())
    samples = _checked(tok, model, checks, max_new_tokens)
    return {
        "logps": logps,
        "preferred": sum(c > r for c, r in logps) / max(1, len(logps)),
        "samples": samples,
        "behaviour": sum(ok for *_, ok in samples) / max(1, len(samples)),
    }


def score_heads(tok, model, path: str, batch_size: int = 16) -> dict:
    """A sequence head over a file: a classifier (num_labels > 1) on {text|messages, label} records (labels by
    the model's id2label; one it does not know is refused naming the record), or a reward model (num_labels 1)
    on preference pairs. Returns the task's eval metrics (val_loss, val_accuracy, ...) and `n`, the records
    scored."""
    from . import tasks

    reward = model.config.num_labels == 1
    task = tasks.get("reward" if reward else "classify")
    if not reward:
        task = task.with_meta({"labels": [model.config.id2label[i] for i in range(model.config.num_labels)]})
    cfg = DataConfig(train=path, task=task.name, max_seq_len=WHOLE_SEQ_LEN, packing=False)
    rows = []
    for where, rec in _records(cfg):
        examples, _ = task.examples(rec, where, cfg, tok)
        rows.append(examples if reward else examples[0])  # a pair is one row of two sequences
    batches = (
        task.collate(rows[i : i + batch_size], cfg.max_seq_len, tok.pad_token_id, False)
        for i in range(0, len(rows), batch_size)
    )
    total, n, sums = loss_sums(model, task, batches)
    return {**task.eval_metrics(float(total), n, tasks.MetricSums.read(sums)), "n": n}


def fmt_score(s: dict) -> str:
    acc = (
        "n/a"
        if s["accuracy"] is None
        else f"{100 * s['accuracy']:.1f}% ({round(s['accuracy'] * s['checked'])}/{s['checked']})"
    )
    tools = ""
    if s.get("tool_accuracy") is not None:
        k, n = sum(ok for *_, ok in s["tool_samples"]), len(s["tool_samples"])
        tools = f"tool calls exact {100 * s['tool_accuracy']:.1f}% ({k}/{n}) | "
    return f"{tools}answer accuracy {acc} | assistant-token loss {s['loss']:.3f} | perplexity {s['ppl']:.2f}"


def score_answers(tok, model, path: str, max_new_tokens: int = 16) -> dict:
    """Verifiable held-out answers: each `{prompt, answer}` record of `path` answered greedily; `strict`:
    the whole reply is the answer (GRPO's `exact` reward), `lenient`: its last number is (`numeric`).
    `samples` holds (question, reply, lenient) per record."""
    from . import rewards
    from .task_settings.grpo import RewardSpec
    from .tasks.grpo import prompt_messages

    where_recs = _records(DataConfig(train=path, task="grpo"))
    recs = [rec for _, rec in where_recs]
    prompts = [prompt_messages(rec, where) for where, rec in where_recs]
    replies = generate(tok, model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, progress=True)
    strict, lenient = (
        scorer(prompts, replies, [], recs)
        for scorer in (rewards.exact(RewardSpec(kind="exact")), rewards.numeric(RewardSpec(kind="numeric")))
    )
    n = max(len(recs), 1)
    return {
        "strict": sum(strict) / n,
        "lenient": sum(lenient) / n,
        "n": len(recs),
        "samples": [
            (p[-1]["content"], a, ok == 1) for p, a, ok in zip(prompts, replies, lenient, strict=True)
        ],
    }


def has_answers(path: str) -> bool:
    """Whether a file's records are verifiable prompts (`{prompt, answer}`, GRPO's records) rather than
    conversations."""
    src = DataConfig(train=path).source("train")
    assert src is not None  # (set from the path)
    # the first record is enough (an empty file goes on to the scorer, which refuses it)
    _, first = next(iter_records(src), ("", {}))
    return "prompt" in first and "answer" in first and "messages" not in first


def fmt_answers(s: dict) -> str:
    return (
        f"reply is exactly the answer {100 * s['strict']:.1f}% | last number is the answer "
        f"{100 * s['lenient']:.1f}% (of {s['n']} held-out questions)"
    )


def fmt_pairs(s: dict) -> str:
    n = len(s["samples"])
    return (
        f"prefers the chosen reply on {100 * s['preferred']:.1f}% of {len(s['logps'])} pairs | "
        "greedy answer as preferred "
        f"{100 * s['behaviour']:.1f}% ({round(s['behaviour'] * n)}/{n})"
    )


def fmt_heads(s: dict, reward: bool) -> str:
    n, acc = s["n"], s["val_accuracy"]
    if reward:
        return (
            f"pairwise accuracy {100 * acc:.1f}% ({round(acc * n)}/{n}) | "
            f"mean margin {s['val_margin']:.3f} | loss {s['val_loss']:.4f}"
        )
    return (
        f"accuracy {100 * acc:.1f}% ({round(acc * n)}/{n}) | "
        f"macro-F1 {s['val_macro_f1']:.3f} | loss {s['val_loss']:.4f}"
    )
