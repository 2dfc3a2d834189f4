"""Shared prefixes: rows that continue one prefix (GRPO's G completions of a prompt) compute that prefix once.

The prefix runs alone, its keys/values (the model's KV cache, kept in the autograd graph when training) are
repeated to each row that continues it, and the rows run after them with their positions counted on from the
prefix's end. The numbers are those of one full row per continuation, up to rounding (tests/test_grpo.py);
the work on the prefix is done once instead of once per row. Any `AutoModelForCausalLM` that takes
`position_ids` and a cache does this (the cache's `batch_repeat_interleave` is transformers' own); prefix
tuning, whose virtual tokens travel as a cache of their own, and gradient checkpointing, which drops the cache
in training, are left on full rows by the caller (a forward that kept no cache is an error here, never a
guess).

`rollout.KVSampler` shares prompts in sampling; `loss.prefixed_logits` serves the loss (right-padded
prefixes, so no query position sees only padding, and gradients flow through the shared keys/values back
into the prefix). Here: the cache's name in and out of a forward, across transformers versions."""

from __future__ import annotations

import inspect


def cache_kw(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in recent transformers, `past_key_values`
    before."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned (`cache`, or `past_key_values` before)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values
