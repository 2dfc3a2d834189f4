"""Pack examples into fixed-length rows, and collate rows or padded examples into model inputs.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask, so
transformers builds a block-diagonal causal mask: packed examples cannot attend to each other
(requires `use_cache=False` in the forward call). Targets are shifted inside each example, so the
last token of one example never learns to predict the first token of the next.

Flash-attention kernels read packed rows from restarting position_ids only at batch size 1 (transformers'
`_is_packed_sequence`); with more rows they would attend across examples. So packed batches also carry the
varlen boundaries, built here on the host as transformers' `DataCollatorWithFlattening` does: `cu_seq_lens`
(int32) over the flattened rows, every example of every row plus each row's padding as a segment of its own
(so the kernel covers every position), and `max_length` (a Python int: no device sync). The loss passes
them to flash kernels only (`Batch.model_inputs`); sdpa and eager keep the position_ids mask.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from itertools import pairwise

import torch

from ..contracts import Batch
from .chat import IGNORE, Example


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most `seq_len` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row id), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
        else:
            cap, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if cap - n > 0:
            bisect.insort(free, (cap - n, r))
    return rows


def _shifted(ex: Example) -> list[int]:
    return ex.labels[1:] + [IGNORE]


def collate_packed(rows: list[list[Example]], seq_len: int, pad_id: int) -> Batch:
    ids, pos, tgt, lengths, cu = [], [], [], [], [0]
    for row in rows:
        r_ids: list[int] = []
        r_pos: list[int] = []
        r_tgt: list[int] = []
        for ex in row:
            r_ids += ex.input_ids
            r_pos += range(len(ex.input_ids))
            r_tgt += _shifted(ex)
            lengths.append(len(ex.input_ids))
            cu.append(cu[-1] + len(ex.input_ids))
        pad = seq_len - len(r_ids)
        if pad:  # the padding attends to itself only (its position_ids restart too)
            cu.append(cu[-1] + pad)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        tgt.append(r_tgt + [IGNORE] * pad)
    return _batch(
        ids,
        tgt,
        lengths,
        position_ids=pos,
        cu_seq_lens=torch.tensor(cu, dtype=torch.int32),
        max_length=max(b - a for a, b in pairwise(cu)),
    )


def collate_padded(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(ex.input_ids) for ex in examples)
    ids, att, tgt, pos = [], [], [], []
    for ex in examples:
        pad = width - len(ex.input_ids)
        ids.append(ex.input_ids + [pad_id] * pad)
        att.append([1] * len(ex.input_ids) + [0] * pad)
        tgt.append(_shifted(ex) + [IGNORE] * pad)
        pos.append(list(range(len(ex.input_ids))) + [0] * pad)
    return _batch(ids, tgt, [len(ex.input_ids) for ex in examples], position_ids=pos, attention_mask=att)


def _batch(
    ids,
    tgt,
    lengths: list[int],
    cu_seq_lens=None,
    max_length: int = 0,
    position_ids=None,
    attention_mask=None,
) -> Batch:
    targets = torch.tensor(tgt, dtype=torch.long)
    # flat positions that carry loss, found here on the host: selecting them on the GPU needs no sync
    loss_index = torch.nonzero(targets.flatten() != IGNORE).squeeze(1)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        targets=targets,
        loss_index=loss_index,
        n_tokens=sum(lengths),
        n_loss=len(loss_index),
        lengths=tuple(lengths),
        cu_seq_lens=cu_seq_lens,
        max_length=max_length,
        position_ids=None if position_ids is None else torch.tensor(position_ids, dtype=torch.long),
        attention_mask=None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long),
    )


def collate_prefixed(prefixes: list[list[int]], rows: list[list[int]], pad_id: int) -> Batch:
    """Shared prefixes, each continued by len(rows) / len(prefixes) consecutive rows (`Batch.prefix_ids`,
    computed once by `loss.prefixed_logits`), both right-padded; every real token of a row is a target (the
    first predicted from its prefix's end)."""
    group = len(rows) // len(prefixes)
    ids, tgt = [], []
    width = max(len(r) for r in rows)
    for r in rows:
        ids.append(r + [pad_id] * (width - len(r)))
        tgt.append(r + [IGNORE] * (width - len(r)))
    att = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    b = _batch(
        ids,
        tgt,
        [len(prefixes[i // group]) + len(r) for i, r in enumerate(rows)],
        attention_mask=att,
    )
    pwidth = max(len(p) for p in prefixes)
    return replace(
        b,
        n_tokens=sum(len(p) for p in prefixes) + sum(len(r) for r in rows),
        prefix_ids=torch.tensor([p + [pad_id] * (pwidth - len(p)) for p in prefixes], dtype=torch.long),
        prefix_mask=torch.tensor([[1] * len(p) + [0] * (pwidth - len(p)) for p in prefixes]),
    )
