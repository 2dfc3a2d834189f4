"""`dist-ft demo`: the two stages of a chat model, offline, scored before and after on held-out data.

- `--stage sft` (configs/demo.yaml): SmolLM2-135M-Instruct fine-tuned on facts about a fictional country;
  held-out questions in unseen phrasings are answered before and after (answer accuracy, assistant-token
  loss).
- `--stage dpo` (configs/demo-dpo.yaml): that model preference-tuned to be honest: the right fact over another
  fact's answer, and "I don't know" over a confident invention when asked what it was never told. Held-out
  pairs (unseen phrasings, unseen unknowns): how often the model prefers the chosen reply (log-prob), the DPO
  reward accuracy of the tuned model against the SFT model, and how often its greedy answer behaves as
  preferred.
- `--stage grpo` (configs/demo-grpo.yaml): SmolLM2-135M-Instruct trained by online RL (GRPO) on "What is a
  plus b? Reply with only the number.", rewarded for a reply that is exactly the sum and (half) for a reply
  whose last number is; held-out sums it never trained on, answered greedily before and after (how often the
  last number is the sum, and how often the reply is only the sum).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

CONFIGS = {"sft": "configs/demo.yaml", "dpo": "configs/demo-dpo.yaml", "grpo": "configs/demo-grpo.yaml"}


def run(config: str | None, overrides: list[str], stage: str = "sft") -> None:
    from .config import load_config

    cfg = load_config(config or CONFIGS[stage], overrides)
    val = cfg.data.source("validation")
    heldout = val.path if val else None
    if heldout is None:
        raise UserError(f"{config or CONFIGS[stage]}: the demo needs data.validation (the held-out set)")
    {"sft": _sft, "dpo": _dpo, "grpo": _grpo}[stage](cfg, heldout)


def _before_after(cfg, train_cfg, scorer, fmt, before_label: str):
    """The base model as it comes scored by `scorer(tok, model)`, then trained on `train_cfg`, and the result
    scored the same way: (before, after, run directory)."""
    import torch

    from . import inference, train
    from .model import load_model
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)
    base = load_model(cfg.model, tok, torch.float32, adapters=False)
    before = scorer(tok, base)
    del base
    print(f"[demo] {before_label}: {fmt(before)}", flush=True)
    out = train.run(train_cfg)
    tok, tuned = inference.load(str(out / "final"))
    return before, scorer(tok, tuned), out


def _sft(cfg, heldout: str) -> None:
    from .evaluate import fmt_score, score

    before, after, out = _before_after(
        cfg, cfg, lambda tok, m: score(tok, m, heldout, cfg.data.task), fmt_score, "before fine-tuning"
    )
    print(f"[demo] before fine-tuning: {fmt_score(before)}")
    print(f"[demo] after  fine-tuning: {fmt_score(after)}")
    n = len(after["samples"])
    # two facts
    _show(
        before, after, [0, n // 2] if n > 1 else range(n), ("base model", "fine-tuned"), ("correct", "wrong")
    )
    print(
        f"[demo] chat with it:  dist-ft chat --model {out / 'final'}\n"
        "[demo] next stage:   dist-ft demo --stage dpo"
    )


def _show(before: dict, after: dict, indices, who: tuple[str, str], marks: tuple[str, str]) -> None:
    """Held-out questions answered before and after training, each answer marked right (marks[0]) or not."""
    for i in indices:
        (q, a0, ok0), (_, a1, ok1) = before["samples"][i], after["samples"][i]
        print(
            f"[demo] held-out  you> {q}\n[demo]   {who[0]}  bot> {a0}   [{marks[not ok0]}]"
            f"\n[demo]   {who[1]}  bot> {a1}   [{marks[not ok1]}]"
        )


def _dpo(cfg, heldout: str) -> None:
    from . import inference, train
    from .evaluate import fmt_pairs, score_pairs

    start = Path(cfg.model.path)
    if not (start / "config.json").is_file():
        raise UserError(
            f"model.path '{cfg.model.path}': no fine-tuned model there; "
            "run the first stage (dist-ft demo) first, which writes it"
        )
    tok, sft = inference.load(str(start))
    before = score_pairs(tok, sft, heldout)
    del sft
    print(f"[demo] SFT model (before DPO): {fmt_pairs(before)}", flush=True)
    out = train.run(cfg)
    tok, tuned = inference.load(str(out / "final"))
    after = score_pairs(tok, tuned, heldout)
    beta = cfg.dpo.beta
    rewards = [
        (beta * (a[0] - b[0]), beta * (a[1] - b[1]))
        for a, b in zip(after["logps"], before["logps"], strict=True)
    ]
    accuracy = sum(c > r for c, r in rewards) / max(1, len(rewards))
    print(f"[demo] SFT model (before DPO): {fmt_pairs(before)}")
    print(f"[demo] after DPO:              {fmt_pairs(after)}")
    print(
        f"[demo] held-out DPO reward accuracy (tuned vs SFT as reference, beta {beta:g}): "
        f"{100 * accuracy:.1f}%, "
        f"mean margin {sum(c - r for c, r in rewards) / max(1, len(rewards)):.3f}"
    )
    pairs = list(zip(before["samples"], after["samples"], strict=True))
    # answers that moved to (or from) the preferred one
    changed = [i for i, (b, a) in enumerate(pairs) if b[2] != a[2]]
    # the first question, the first change, the last question
    _show(
        before,
        after,
        dict.fromkeys([0, *changed[:1], len(pairs) - 1]),
        ("SFT model ", "after DPO "),
        ("as preferred", "not preferred"),
    )
    print(f"[demo] chat with it:  dist-ft chat --model {out / 'final'}")


def _grpo(cfg, heldout: str) -> None:
    from .evaluate import fmt_answers, score_answers

    # the held-out set is scored here, greedily; the loop's own validation would sample it G times
    train_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"validation": None})})
    before, after, out = _before_after(
        cfg, train_cfg, lambda tok, m: score_answers(tok, m, heldout), fmt_answers, "before GRPO"
    )
    print(f"[demo] before GRPO: {fmt_answers(before)}")
    print(f"[demo] after GRPO:  {fmt_answers(after)}")
    _show(before, after, range(min(3, after["n"])), ("base model", "after GRPO"), ("right sum", "wrong sum"))
    print(f"[demo] chat with it:  dist-ft chat --model {out / 'final'}")
