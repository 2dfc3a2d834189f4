"""Shared prefixes: rows that continue one prefix (GRPO's G completions of a prompt) compute that prefix once.

The prefix runs alone, its keys/values (the model's KV cache, kept in the autograd graph when training) are
repeated to each row that continues it, and the rows run after them with their positions counted on from the
prefix's end. The numbers are those of one full row per continuation, up to rounding (tests/test_grpo.py);
the work on the prefix is done once instead of once per row. Any `AutoModelForCausalLM` that takes
`position_ids` and a cache does this (the cache's `batch_repeat_interleave` is transformers' own); prefix
tuning, whose virtual tokens travel as a cache of their own, and gradient checkpointing, which drops the cache
in training, are left on full rows by the caller (a forward that kept no cache is an error here, never a
guess).

`rollout.KVSampler` shares prompts in sampling; `prefixed_logits` here serves the loss (right-padded
prefixes, so no query position sees only padding, and gradients flow through the shared keys/values back
into the prefix)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .contracts import Batch


def cache_kw(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in recent transformers, `past_key_values`
    before."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned (`cache`, or `past_key_values` before)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def prefixed_logits(engine, batch: Batch, index: torch.Tensor) -> torch.Tensor:
    """Logits of a prefix batch's loss positions `index` (flat into `batch.input_ids`), in that order. Row r
    continues prefix r // (rows / prefixes); its target at column j is predicted from column j - 1, and
    from the prefix's last real position at j = 0. The output layer runs on those positions only (a
    pre-hook selects them inside each forward, so ZeRO-3's hooks still gather its weight)."""
    model = getattr(engine, "module", engine)
    dev = engine.device
    head = model.get_output_embeddings()
    assert batch.prefix_ids is not None and batch.prefix_mask is not None and batch.attention_mask is not None
    pids, pmask = batch.prefix_ids.to(dev), batch.prefix_mask.to(dev)
    ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    n_pre, width = pids.shape
    rows, cols = ids.shape
    group = rows // n_pre
    plen = pmask.sum(1)
    last = torch.arange(n_pre, device=dev) * width + plen - 1
    col = index % cols
    first = col == 0
    rest = index[~first] - 1

    def run(select: torch.Tensor, **kw) -> tuple[torch.Tensor, Any]:
        hook = head.register_forward_pre_hook(lambda _, a: (a[0].flatten(0, -2).index_select(0, select),))
        try:
            out = engine(**kw, use_cache=True)
        finally:
            hook.remove()
        return out.logits, cache_of(out)

    pos = torch.arange(width, device=dev).expand(n_pre, -1)
    head_logits, cache = run(last, input_ids=pids, attention_mask=pmask, position_ids=pos)
    if cache is None or cache.get_seq_length() != width:  # (gradient checkpointing drops it): never guess
        raise RuntimeError(
            f"{type(model).__name__} kept no KV cache of the shared prefixes (gradient checkpointing?); "
            "set grpo.share_prompts=false"
        )
    cache.batch_repeat_interleave(group)
    rest_logits, _ = run(
        rest,
        input_ids=ids,
        attention_mask=torch.cat([pmask.repeat_interleave(group, 0), mask], 1),
        position_ids=plen.repeat_interleave(group)[:, None] + torch.arange(cols, device=dev),
        **{cache_kw(engine): cache},
    )
    # in loss order: a row's first target from its prefix's last position, the others from the row
    src = torch.where(first, index // cols // group, n_pre + torch.cumsum((~first).long(), 0) - 1)
    return torch.cat([head_logits, rest_logits]).index_select(0, src)
