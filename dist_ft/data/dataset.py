"""Build tokenized train/validation sets from the data config, and iterate them per rank.

`BatchStream` walks one deterministic global order per epoch (seeded permutation) and gives each
rank a disjoint slice of every global micro-batch. Its state (epoch, position) is two integers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from .chat import Example, tokenize_conversation, tokenize_text
from .formats import to_conversation
from .packing import collate_packed, collate_padded, pack
from .sources import read_records


@dataclass
class Split:
    items: list  # packed rows (list[Example]) or single Examples
    stats: dict = field(default_factory=dict)


@dataclass
class Prepared:
    train: Split
    val: Split | None
    packing: bool
    seq_len: int
    pad_id: int

    def collate(self, items: list) -> dict:
        if self.packing:
            return collate_packed(items, self.seq_len, self.pad_id)
        return collate_padded(items, self.pad_id)


def _tokenize(records: list[tuple[str, dict]], cfg: DataConfig, tok) -> tuple[list[Example], dict]:
    examples: list[Example] = []
    stats = {"records": len(records), "truncated": 0, "dropped_overlong": 0, "dropped_no_loss_after_truncation": 0}
    for where, rec in records:
        conv = to_conversation(rec, cfg.format, where)
        if conv.text is not None:
            if cfg.task == "sft":
                raise UserError(f"{where}: raw 'text' record in an SFT run; set data.task: pretrain for continued pretraining, or use chat records")
            examples += tokenize_text(tok, conv.text, cfg.max_seq_len)
            continue
        ex = tokenize_conversation(tok, conv, where)
        if cfg.task == "pretrain":  # chat data as plain text: loss everywhere
            ex = Example(ex.input_ids, list(ex.input_ids))
        if len(ex.input_ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ex = Example(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
            stats["truncated"] += 1
            if ex.n_loss == 0:
                stats["dropped_no_loss_after_truncation"] += 1
                continue
        examples.append(ex)
    stats["examples"] = len(examples)
    stats["tokens"] = sum(len(e.input_ids) for e in examples)
    stats["loss_tokens"] = sum(e.n_loss for e in examples)
    return examples, stats


def _to_split(examples: list[Example], stats: dict, cfg: DataConfig) -> Split:
    if not cfg.packing:
        return Split(examples, stats)
    rows = [[examples[i] for i in row] for row in pack([len(e.input_ids) for e in examples], cfg.max_seq_len)]
    stats["rows"] = len(rows)
    stats["padding_fraction"] = round(1 - stats["tokens"] / max(1, len(rows) * cfg.max_seq_len), 4)
    return Split(rows, stats)


def build(cfg: DataConfig, tok) -> Prepared:
    """Read, convert, tokenize, split and pack. Every bad record raises UserError naming it."""
    train_recs = read_records(cfg.train)
    val_recs = read_records(cfg.validation) if cfg.validation else []
    if not cfg.validation and cfg.val_fraction > 0:
        order = list(range(len(train_recs)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(order)))
        held = set(order[:n_val])
        val_recs = [r for i, r in enumerate(train_recs) if i in held]
        train_recs = [r for i, r in enumerate(train_recs) if i not in held]
    train_ex, train_stats = _tokenize(train_recs, cfg, tok)
    if not train_ex:
        raise UserError(f"{cfg.train.path}: no training examples left after filtering ({train_stats}); "
                        "raise data.max_seq_len or set data.overlong: truncate")
    val = None
    if val_recs:
        val_ex, val_stats = _tokenize(val_recs, cfg, tok)
        val = _to_split(val_ex, val_stats, cfg) if val_ex else None
    return Prepared(_to_split(train_ex, train_stats, cfg), val, cfg.packing, cfg.max_seq_len, tok.pad_token_id)


class BatchStream:
    """Per-rank micro-batches from one global, epoch-seeded order; exact position is (epoch, pos)."""

    def __init__(self, n_items: int, micro: int, rank: int, world: int, seed: int):
        self.n, self.micro, self.rank, self.world, self.seed = n_items, micro, rank, world, seed
        self.epoch, self.pos = 0, 0
        if self.micro_steps_per_epoch == 0:
            raise UserError(f"data: {n_items} training items but one global micro-batch needs {micro * world} "
                            f"(train.micro_batch_size x world size); add data or lower train.micro_batch_size")
        self._perm_epoch, self._perm = -1, None

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.n // (self.micro * self.world)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        span = self.micro * self.world
        if self.pos + span > self.n:  # the ragged tail is dropped so all ranks take the same number of steps
            self.epoch, self.pos = self.epoch + 1, 0
        start = self.pos + self.rank * self.micro
        self.pos += span
        return self._order()[start : start + self.micro].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def eval_batches(prep: Prepared, micro: int, rank: int, world: int) -> list[dict]:
    """This rank's validation batches; every rank gets the same count (padding batches carry no loss)."""
    items = prep.val.items
    mine = items[rank::world]
    n_batches = -(-(-(-len(items) // world)) // micro)
    out = []
    for b in range(n_batches):
        chunk = mine[b * micro : (b + 1) * micro]
        if chunk:
            out.append(prep.collate(chunk))
        else:  # keep collectives (ZeRO-3 gathers) in step across ranks
            batch = prep.collate(items[:1])
            batch["targets"].fill_(-100)
            batch["n_loss"] = batch["n_tokens"] = 0
            out.append(batch)
    return out
