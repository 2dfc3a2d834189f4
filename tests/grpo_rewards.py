"""Reward functions the GRPO tests name as `grpo_rewards:<name>` (imported by dist_ft from PYTHONPATH)."""

CALLS = {"n": 0}


def vowels(prompts, completions, **fields):
    """The share of a completion's letters that are vowels: dense, so a tiny random model can move it."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / max(len(letters), 1))
    return out


def nan_at_step_two(prompts, completions, **fields):
    CALLS["n"] += 1
    return [float("nan") if CALLS["n"] >= 2 else 0.0] * len(completions)
