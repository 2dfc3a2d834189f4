"""GRPO's rewards (`grpo.rewards`): built-ins for verifiable answers, a user's Python function, a reward
model. Each turns (prompts, completions, the records' fields) into one float per completion; a wrong shape or
a non-finite value is a one-line error naming the reward."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .errors import UserError
from .task_settings.grpo import RewardSpec

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# (prompts: each a string or messages, completions, their token counts, the records' fields) -> rewards
Scorer = Callable[[Sequence[Any], Sequence[str], Sequence[int], Sequence[dict]], list[float]]


def _answer(text: str, pattern: str | None, numeric: bool) -> str | None:
    if pattern is not None:
        m = re.search(pattern, text, flags=re.DOTALL)
        return m.group(1).strip() if m and m.groups() else (m.group(0).strip() if m else None)
    if numeric:
        found = NUMBER.findall(text)
        return found[-1] if found else None
    return text.strip()


def _number(s: str | None) -> float | None:
    try:
        return float(s.replace(",", "")) if s is not None else None
    except ValueError:
        return None


def _expected(fields: dict, spec: RewardSpec) -> str:
    if "answer" not in fields:
        raise UserError(
            f"grpo.rewards: the `{spec.kind}` reward compares with each record's `answer`, and a record has "
            "none; add `answer` to every record or use another reward"
        )
    return str(fields["answer"])


def exact(spec: RewardSpec) -> Scorer:
    def score(prompts, completions, lengths, fields):
        return [
            float(_answer(c, spec.answer_pattern, False) == _expected(f, spec).strip())
            for c, f in zip(completions, fields, strict=True)
        ]

    return score


def numeric(spec: RewardSpec) -> Scorer:
    def score(prompts, completions, lengths, fields):
        out = []
        for c, f in zip(completions, fields, strict=True):
            got, want = _number(_answer(c, spec.answer_pattern, True)), _number(_expected(f, spec))
            out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6)))
        return out

    return score


def regex(spec: RewardSpec) -> Scorer:
    pattern = re.compile(spec.pattern or "", flags=re.DOTALL)
    return lambda prompts, completions, lengths, fields: [float(bool(pattern.search(c))) for c in completions]


def length(max_tokens: int) -> Scorer:
    return lambda prompts, completions, lengths, fields: [-n / max_tokens for n in lengths]


def function(spec: RewardSpec) -> Scorer:
    """The user's `package.module:name`, imported (never evaluated from text)."""
    module, _, name = (spec.function or "").partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"grpo.rewards: function '{spec.function}' cannot be imported ({type(e).__name__}: {e}); put its "
            "module on PYTHONPATH (or install it) and check the name"
        ) from None
    if not callable(fn):
        raise UserError(f"grpo.rewards: '{spec.function}' is not a function")

    def score(prompts, completions, lengths, fields):
        keys = set().union(*(f.keys() for f in fields)) if fields else set()
        columns = {k: [f.get(k) for f in fields] for k in sorted(keys)}
        try:
            return fn(prompts=list(prompts), completions=list(completions), **columns)
        except Exception as e:  # noqa: BLE001 - the user's code: any failure becomes one line naming it
            raise UserError(
                f"grpo.rewards: function '{spec.function}' raised {type(e).__name__}: {e}"
            ) from None

    return score


def build(specs: Sequence[RewardSpec], max_tokens: int, reward_model: Callable[[str], Scorer]) -> list:
    """(spec, scorer) for every configured reward, imported and loaded now (before any step)."""
    make: dict[str, Callable[[RewardSpec], Scorer]] = {
        "exact": exact,
        "numeric": numeric,
        "regex": regex,
        "length": lambda s: length(max_tokens),
        "function": function,
        "model": lambda s: reward_model(s.path or ""),
    }
    return [(s, make[s.kind](s)) for s in specs]


def checked(spec: RewardSpec, values, n: int) -> list[float]:
    """`values` as n finite floats, or the one-line error naming the reward."""
    what = f"grpo.rewards: {spec.kind} reward '{spec.label}'"
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{what} returned {type(values).__name__}, not a list of {n} numbers") from None
    if len(out) != n:
        raise UserError(f"{what} returned {len(out)} values for {n} completions; return one per completion")
    bad = next((i for i, v in enumerate(out) if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"{what} returned {out[bad]} for completion {bad}; rewards must be finite numbers")
    return out


def reward_model(path: str) -> Scorer:
    """A `data.task: reward` export (a one-label sequence head) scoring each prompt + completion, rendered
    with its own tokenizer's chat template, in batches of 16 under no_grad; loaded now (on the CPU), moved
    to this rank's device at its first use."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:  # missing, damaged, or weights of another shape
        raise UserError(
            f"grpo.rewards: reward model '{path}' cannot be loaded ({str(e).splitlines()[0][:200]}); "
            "give the final/ directory of a data.task: reward run"
        ) from None
    if model.config.num_labels != 1:
        raise UserError(
            f"grpo.rewards: '{path}' has {model.config.num_labels} labels; a reward model has one "
            "(data.task: reward)"
        )
    tok.padding_side = "right"

    def score(prompts, completions, lengths, fields):
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        model.to(dev)
        texts = [
            tok.apply_chat_template([*f["_messages"], {"role": "assistant", "content": c}], tokenize=False)
            for c, f in zip(completions, fields, strict=True)
        ]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                enc = tok(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
                out += model(**enc.to(dev)).logits[:, 0].float().tolist()
        return out

    return score
