"""Summed next-token cross-entropy of a batch (`token_loss_sum`), fused with the output layer in chunks of
positions.

The plain way, `cross_entropy(head(h).float(), y)`, holds tokens x vocab logits in the model dtype, their
fp32 copy and log-softmax for backward: with a 50k-150k vocabulary that is most of a small model's
activation memory (8 x 1024 tokens x 128k vocab x 4 B = 4 GiB for the fp32 copy alone). Here the output
layer and the loss run one chunk of positions at a time, and each chunk's gradients (w.r.t. the hidden
states, the output weight and bias) are computed right there, in the forward pass, from that chunk's
softmax; backward only scales them by the incoming gradient. Peak extra memory is one chunk's logits plus
the gradient buffers (n x hidden, vocab x hidden) - the same three matmuls as forward + backward, no
recomputation. Equal to the plain loss and gradients to fp32 rounding (tests/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contracts import Batch
from .prefix import cache_kw, cache_of


def _chunked(h, weight, bias, targets, chunk: int, need_h: bool, need_w: bool, need_b: bool):
    """The summed loss, and (where asked) its gradients w.r.t. h, weight and bias, `chunk` positions at a
    time."""
    n = h.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    g_h = torch.empty_like(h) if need_h else None
    g_w = g_b = None
    chunk = chunk or max(n, 1)
    for s in range(0, n, chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]
        logits = F.linear(hc, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
        if not (need_h or need_w or need_b):
            continue
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        g[torch.arange(len(tc), device=g.device), tc] -= 1.0  # d(sum of -log p[target]) / d logits
        if need_b:
            g_b = g.sum(0) if g_b is None else g_b.add_(g.sum(0))
        g = g.to(h.dtype)
        if g_h is not None:  # need_h
            g_h[s : s + chunk] = g @ weight
        if need_w:
            gw = (g.t() @ hc).float()
            g_w = gw if g_w is None else g_w.add_(gw)  # accumulated in fp32 across chunks
    # no loss-bearing position here (e.g. a sequence-parallel shard of prompt tokens): the weights still get
    # a (zero) gradient, as autograd gives a used weight - ZeRO-3 reduces one for every parameter it gathered
    if need_w and g_w is None:
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if need_b and g_b is None:
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    return total, g_h, g_w, g_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total, g_h, g_w, g_b = _chunked(
            h, weight, bias, targets, chunk, need_h, need_w, bias is not None and need_b
        )
        # kept until backward in the dtype of what they are gradients of, as autograd would hand them over
        ctx.save_for_backward(
            g_h, None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(bias.dtype)
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return *(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors), None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """sum_i -log softmax(h_i W^T + b)[targets_i], fp32, `chunk` positions at a time (0: all at once).
    `h` is [n, hidden] (only loss-bearing positions), `targets` [n]."""
    if not torch.is_grad_enabled():  # evaluation: no gradients to compute ahead
        return _chunked(h, weight, bias, targets, chunk, False, False, False)[0]
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk)


# config attributes of models that transform the output layer's logits (softcapping, scaling): the fused loss
# would skip that, so these take the plain path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _fusable(model, head, chunk: int) -> bool:
    if not chunk or not isinstance(head, torch.nn.Linear):
        return False
    return all(getattr(model.config, a, None) in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)


def attn_implementation(model) -> str | None:
    """The attention kernel the model runs (flash kernels need packed rows' boundaries passed:
    `Batch.model_inputs`)."""
    return getattr(model.config, "_attn_implementation", None)


def token_loss_sum(engine, batch: Batch, chunk: int = 4096) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's loss-bearing targets (fp32), a 0-d tensor on the
    device.

    The output layer runs only on positions that carry loss: with a 50k vocabulary it is much of a small
    model's compute and nearly all of its activation memory, and in chat SFT a third or more of the
    positions (prompts, system turns, padding) carry no loss. With `chunk` > 0 the output layer and the
    loss are fused and run `chunk` positions at a time (``linear_cross_entropy` above): tokens x vocab logits
    never exist whole. The call goes through the output layer module itself, so ZeRO-3's hooks gather its
    weight. Works with any engine or plain HF model. Nothing here waits for the device (no host sync)."""
    model = getattr(engine, "module", engine)
    dev = engine.device
    kw = batch.model_inputs(dev, attn_implementation(model))
    index = batch.loss_index.to(dev, non_blocking=True)
    targets = batch.targets.to(dev, non_blocking=True).flatten().index_select(0, index)
    head = model.get_output_embeddings()

    def kept(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.flatten(0, -2).index_select(0, index)

    if _fusable(model, head, chunk):
        fused = []

        def fused_head(
            hidden: torch.Tensor,
        ) -> torch.Tensor:  # runs inside the head module's call (and its hooks)
            fused.append(linear_cross_entropy(kept(hidden), head.weight, head.bias, targets, chunk))
            return fused[-1]

        head.forward = fused_head
        try:
            out = engine(**kw, use_cache=False).logits
        finally:
            del head.forward
        # the same numbers, maybe re-wrapped (ZeRO-3's backward hook returns a detached view of the output); a
        # model that softcaps or scales its logits would return new ones, and the fused loss would be wrong
        # for it
        if out.shape != () or out.data_ptr() != fused[-1].data_ptr():
            raise RuntimeError(
                f"{type(model).__name__} changes its output layer's result before returning it; set "
                "engine.loss_chunk_tokens=0"
            )
        return out
    handle = head.register_forward_pre_hook(lambda _, args: (kept(args[0]),)) if head is not None else None
    try:
        logits = engine(**kw, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        logits = kept(logits)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def target_logps(engine, batch: Batch, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probability of each loss-bearing target of `batch`, [n] fp32 on the device (log-softmax in
    fp32), and with `entropy` each position's predictive entropy (no gradient). The output layer runs on
    those positions only (a pre-hook selects them, so ZeRO-3's hooks still gather its weight); logits of
    them are kept for backward (n x vocab fp32: completions of the pairwise and RL tasks are short). A batch
    of shared prefixes (`Batch.prefix_ids`) computes each prefix once (`prefixed_logits`)."""
    model = getattr(engine, "module", engine)
    dev = engine.device
    index = batch.loss_index.to(dev, non_blocking=True)
    targets = batch.targets.to(dev, non_blocking=True).flatten().index_select(0, index)
    if batch.prefix_ids is not None:  # rows continuing shared prefixes, each computed once
        logits = prefixed_logits(engine, batch, index)
    else:
        inputs = batch.model_inputs(dev, attn_implementation(model))
        logits = _logits_at(engine, index, **inputs, use_cache=False).logits
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), ent


def _logits_at(engine, select: torch.Tensor, **inputs):
    """The model's output for `inputs` with the output layer run only on the flat positions `select` (a
    pre-hook selects them inside the forward, so ZeRO-3's hooks still gather its weight)."""
    head = getattr(engine, "module", engine).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].flatten(0, -2).index_select(0, select),))
    try:
        return engine(**inputs)
    finally:
        handle.remove()


def prefixed_logits(engine, batch: Batch, index: torch.Tensor) -> torch.Tensor:
    """Logits of a prefix batch's loss positions `index` (flat into `batch.input_ids`), in that order. Row r
    continues prefix r // (rows / prefixes); its target at column j is predicted from column j - 1, and
    from the prefix's last real position at j = 0 (the prefixes run once, the rows after their keys/values
    repeated: `prefix.py`). The output layer runs on those positions only (`_logits_at`)."""
    model = getattr(engine, "module", engine)
    dev = engine.device
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

    pos = torch.arange(width, device=dev).expand(n_pre, -1)
    out = _logits_at(engine, last, input_ids=pids, attention_mask=pmask, position_ids=pos, use_cache=True)
    head_logits, cache = out.logits, cache_of(out)
    if cache is None or cache.get_seq_length() != width:  # (gradient checkpointing drops it): never guess
        raise RuntimeError(
            f"{type(model).__name__} kept no KV cache of the shared prefixes (gradient checkpointing?); "
            "set grpo.share_prompts=false"
        )
    cache.batch_repeat_interleave(group)
    rest_logits = _logits_at(
        engine,
        rest,
        input_ids=ids,
        attention_mask=torch.cat([pmask.repeat_interleave(group, 0), mask], 1),
        position_ids=plen.repeat_interleave(group)[:, None] + torch.arange(cols, device=dev),
        use_cache=True,
        **{cache_kw(engine): cache},
    ).logits
    # in loss order: a row's first target from its prefix's last position, the others from the row
    src = torch.where(first, index // cols // group, n_pre + torch.cumsum((~first).long(), 0) - 1)
    return torch.cat([head_logits, rest_logits]).index_select(0, src)


def sequence_logps(engine, batch: Batch, seq_of_loss: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Each sequence's summed log-probability of its loss-bearing targets, [n_seq] fp64 on the device
    (`target_logps` summed in fp64, over the shards of a sequence-parallel group); `seq_of_loss[i]` is the
    sequence of the batch's i-th loss position."""
    logp, _ = target_logps(engine, batch)
    sums = torch.zeros(n_seq, dtype=torch.float64, device=logp.device).index_add(
        0, seq_of_loss.to(logp.device), logp.double()
    )
    # sequence parallelism: each rank scored its shard of every sequence
    return engine.sequence_sum(sums) if hasattr(engine, "sequence_sum") else sums


def batch_sequence_logps(engine, batch: Batch) -> torch.Tensor:
    """`sequence_logps` of a pairwise task's batch, whose `extra` maps its loss positions to sequences
    (`seq_of_loss`, `n_seq`); a padding batch (`Batch.without_loss`) keeps the forward and scores nothing."""
    return sequence_logps(
        engine, batch, batch.extra["seq_of_loss"][: batch.loss_index.numel()], batch.extra["n_seq"]
    )
