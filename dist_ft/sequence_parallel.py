"""Sequence parallelism's glue (`engine.sequence_parallel` = sp > 1): which rows a rank reads, and its shard
of each row. The attention itself is DeepSpeed's Ulysses (`engine_sp.py` registers it).

Ranks form groups of sp consecutive ranks (DeepSpeed's layout: ranks [i*sp, (i+1)*sp) share sequences); the
groups are the data-parallel ranks, so the sample stream and validation split rows over `world // sp` readers,
and every rank of a group reads the same rows. Each rank then keeps one contiguous 1/sp of every row: input
ids, position ids (the row's own, so after Ulysses gathers them attention sees positions 0..n-1) and targets.
Targets are already shifted (position i is scored against token i+1), so the token that predicts the first
token of shard k+1 lives at the end of shard k and no label crosses a boundary. Rows are padded (right) to a
multiple of sp and batches to exactly `train.micro_batch_size` rows (Ulysses reshapes by that fixed size);
padding carries no loss. The loss of a rank is its shard's summed loss; the step's normalization counts
loss-bearing tokens over every rank, so shards add up to the whole sequence's mean. A loss over whole
sequences (DPO: a pair's log-probs) sums its shards' per-sequence parts over the group
(`Engine.sequence_sum`), so every rank of the group holds the batch's whole loss and counts its units: summed
over the ranks, loss and units are both sp times the batch's, and the all-reduce's backward hands each shard
the whole gradient.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .config import Config
from .contracts import Batch
from .data.chat import IGNORE
from .errors import UserError


def readers(rank: int, world: int, sp: int) -> tuple[int, int]:
    """(this rank's data-parallel rank, the data-parallel world): the rows' readers under sequence
    parallelism."""
    if world % sp:
        raise UserError(
            f"engine.sequence_parallel {sp} does not divide the world size {world}; launch a multiple of "
            f"{sp} ranks, or set engine.sequence_parallel to a divisor of {world}"
        )
    return rank // sp, world // sp


def batch_rows(cfg: Config) -> int:
    """Rows of every micro-batch under sequence parallelism (Ulysses reshapes by a fixed count): one per
    example, or per group of a task's examples when unpacked (a preference pair: 2 rows); packed rows hold
    whole groups."""
    from . import tasks

    return cfg.train.micro_batch_size * (1 if cfg.data.packing else tasks.for_config(cfg).group)


def spanning(hosts: list[str], sp: int) -> str | None:
    """Why a group of `sp` consecutive ranks would span nodes (`hosts`: each rank's host, in rank order), or
    None when every group lies on one node: Ulysses runs two all-to-alls per layer inside a group, made for a
    node's fast links, not for the network between nodes."""
    per_node = {h: hosts.count(h) for h in hosts}
    for g in range(0, len(hosts), sp):
        mine = hosts[g : g + sp]
        if len(set(mine)) > 1:
            fit = min(per_node.values())
            return (
                f"engine.sequence_parallel {sp}: ranks {g}-{g + sp - 1} would share sequences across nodes "
                f"({', '.join(sorted(set(mine)))}), and Ulysses runs two all-to-alls per layer between them; "
                f"set engine.sequence_parallel to a divisor of the ranks per node ({fit})"
            )
    return None


def shard(b: Batch, sp_rank: int, sp: int, rows: int, pad_id: int) -> Batch:
    """Rank `sp_rank`'s contiguous 1/sp of every row of a batch (padded or packed), padded to `rows` rows.
    The padding's positions go on from the row's last, so it adds no example boundary (packed rows: the
    attention splits examples where positions restart, `engine_sp.per_example`)."""
    n, w = b.input_ids.shape
    width = -(-w // sp) * sp
    real = b.attention_mask if b.attention_mask is not None else torch.ones_like(b.input_ids)
    pos = b.position_ids if b.position_ids is not None else torch.arange(w).expand(n, w)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - w, 0, rows - n), value=value)

    c = width // sp
    part = slice(c * sp_rank, c * (sp_rank + 1))
    ids, tgt = padded(b.input_ids, pad_id)[:, part], padded(b.targets, IGNORE)[:, part]
    # (padding follows every real token, and attention looks only backwards)
    pos = padded(pos, 0)
    pos[:, w:] = pos[:, w - 1 : w] + torch.arange(1, width - w + 1)
    pos[n:] = torch.arange(width)
    pos = pos[:, part]
    mine = padded(real, 0)[:, part]
    loss_index = torch.nonzero(tgt.flatten() != IGNORE).squeeze(1)
    extra, n_loss = b.extra, len(loss_index)
    if "seq_of_loss" in extra:  # a loss over whole sequences (DPO): its units stay the batch's, on every rank
        seq = torch.full((n * w,), -1, dtype=torch.long).index_copy(0, b.loss_index, extra["seq_of_loss"])
        seq = F.pad(seq.view(n, w), (0, width - w, 0, rows - n), value=-1)[:, part]
        extra, n_loss = {**extra, "seq_of_loss": seq.flatten().index_select(0, loss_index)}, b.n_loss
    return replace(
        b,
        extra=extra,
        input_ids=ids.contiguous(),
        targets=tgt.contiguous(),
        loss_index=loss_index,
        n_tokens=int(mine.sum()),
        n_loss=n_loss,
        position_ids=pos.contiguous(),
        attention_mask=None,  # Ulysses attends causally over the gathered sequence; it drops any mask
        cu_seq_lens=None,  # the whole row's boundaries are found from the gathered positions
        max_length=0,
    )
