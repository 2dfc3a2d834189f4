"""The records of one split, tokenized in order: in-process for small sources, else in a worker pool.

Workers return each example as raw arrays (uint32 token ids, uint8 loss mask) ready for the shard writer,
with the stats of its record; results come back in record order whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain, islice

import numpy as np

from ...config import DataConfig, SourceConfig
from ..chat import IGNORE
from ..sources import iter_records
from .manifest import SplitStats

BATCH = 256  # records per worker task
POOL_AFTER = 2048  # smaller sources are tokenized in-process: a pool costs more than it saves

Record = tuple[int, str, dict]  # (index in the source, where (file:line), record)
# (index, [(token ids, loss mask)] per example, the record's stats)
Encoded = tuple[int, list[tuple[bytes, bytes]], SplitStats]


def _held_out(seed: int, i: int, fraction: float) -> bool:
    """Deterministic per-record validation split that needs no record count (works for streams)."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


def split_records(cfg: DataConfig, split: str) -> tuple[SourceConfig, Iterator[Record]]:
    """The source of `split` and its records, numbered by their index in that source."""
    val = cfg.source("validation")
    if split == "validation" and val is not None:
        return val, ((i, w, r) for i, (w, r) in enumerate(iter_records(val)))
    src, frac = cfg.source("train"), (cfg.val_fraction if val is None else 0.0)
    # prepare runs only with a data.train: dist-ft prepare checks it, a config without data.prepared needs it
    assert src is not None
    want = split == "validation"
    return src, (
        (i, w, r)
        for i, (w, r) in enumerate(iter_records(src))
        if frac == 0 or _held_out(cfg.seed, i, frac) == want
    )


def _encode(batch: list[Record], cfg: DataConfig, tok, task) -> list[Encoded]:
    out = []
    for i, where, rec in batch:
        examples, stats = task.examples(rec, where, cfg, tok)
        arrays = [
            (
                np.asarray(e.input_ids, dtype=np.uint32).tobytes(),
                (np.asarray(e.labels) != IGNORE).astype(np.uint8).tobytes(),
            )
            for e in examples
        ]
        out.append((i, arrays, stats))
    return out


_WORKER: dict = {}


def _init_worker(cfg: DataConfig, tok, task) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER.update(cfg=cfg, tok=tok, task=task)


def _encode_in_worker(batch: list[Record]) -> list[Encoded]:
    return _encode(batch, _WORKER["cfg"], _WORKER["tok"], _WORKER["task"])


def _ordered_map(pool, batches: Iterable[list[Record]], depth: int) -> Iterator[list[Encoded]]:
    """Results of `_encode_in_worker` in input order, with at most `depth` batches in flight (Pool.imap
    would read the whole source ahead into memory)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_in_worker, (batch,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _num_proc(n: int) -> int:
    return n if n > 0 else len(os.sched_getaffinity(0))


@contextmanager
def encoded(
    cfg: DataConfig, tok, task, records: Iterator[Record]
) -> Iterator[tuple[Iterator[list[Encoded]], int]]:
    """Yields (batches of encoded records in order, number of processes encoding them). A pool of
    data.num_proc workers is used when the source has more than POOL_AFTER records; it ends on exit."""

    def batches():
        while batch := list(islice(records, BATCH)):
            yield batch

    gen = batches()
    head = list(islice(gen, max(1, POOL_AFTER // BATCH)))
    procs = _num_proc(cfg.num_proc)
    if len(head) == POOL_AFTER // BATCH and procs > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(procs, _init_worker, (cfg, tok, task))
        try:
            yield _ordered_map(pool, chain(head, gen), depth=4 * procs), procs
        finally:
            pool.terminate()
    else:
        yield (_encode(b, cfg, tok, task) for b in chain(head, gen)), 1
