"""One deterministic global sample order over token shards, and each rank's slice of it.

Epoch e's order: the shards in an epoch-seeded order, their rows concatenated, then shuffled inside
windows of `window` rows (each window seeded by epoch and window number). Epochs follow one another
without a gap, so a global stream position names one sample whatever the world size. Rank r of W
takes samples [r*micro, (r+1)*micro) of every global micro-batch of micro x W samples.

The state is the global position (plus what it was computed on): restoring it continues the exact
sequence, on the same or on another world size (no sample skipped or repeated in the global order).
Nothing here reads data; it only maps positions to row ids, with O(window) memory.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import UserError


class Order(Protocol):
    """Stream position -> row id: `GlobalOrder` here, or a mixture's (`mixture.MixtureOrder`)."""

    n: int  # samples per epoch
    seed: int
    window: int

    def row(self, g: int) -> int: ...


class GlobalOrder:
    """Stream position -> row id (rows numbered shard by shard, as `ShardSet` numbers them)."""

    def __init__(self, shard_rows: list[int], seed: int, window: int):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.n = int(self.shard_rows.sum())
        if self.n == 0:
            raise UserError(
                "data: the shards hold no rows; prepare them from a source with training examples"
            )
        self.seed, self.window = seed, max(1, window)
        self.shard_start = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]])
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_cache: dict[tuple[int, int], np.ndarray] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            order = np.random.default_rng([self.seed, e]).permutation(len(self.shard_rows))
            self._epoch_cache = (e, order, np.cumsum(self.shard_rows[order]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _perm(self, e: int, w: int) -> np.ndarray:
        key = (e, w)
        if key not in self._window_cache:
            if len(self._window_cache) >= 4:  # a rank walks forward; keep the few windows it straddles
                self._window_cache.pop(next(iter(self._window_cache)))
            size = min(self.window, self.n - w * self.window)
            self._window_cache[key] = np.random.default_rng([self.seed, e, w + 1]).permutation(size)
        return self._window_cache[key]

    def row(self, g: int) -> int:
        e, p = divmod(g, self.n)
        w, i = divmod(p, self.window)
        q = w * self.window + int(self._perm(e, w)[i])  # position in the epoch's shard-ordered concatenation
        order, cum = self._epoch(e)
        k = int(np.searchsorted(cum, q, side="right"))
        local = q - (int(cum[k - 1]) if k else 0)
        return int(self.shard_start[order[k]]) + local


class SampleStream:
    """This rank's micro-batches of row ids; `state_dict()` is the global position, valid for any world
    size."""

    def __init__(self, order: Order, micro: int, rank: int, world: int, fingerprint: str = ""):
        self.order, self.micro, self.rank, self.world, self.fingerprint = (
            order,
            micro,
            rank,
            world,
            fingerprint,
        )
        self.index = 0  # global stream position of the next global micro-batch
        if order.n < micro * world:
            raise UserError(
                f"data: {order.n} training rows but one global micro-batch needs {micro * world} "
                f"(train.micro_batch_size x world size); add data or lower train.micro_batch_size"
            )

    @property
    def n(self) -> int:
        return self.order.n

    @property
    def epoch(self) -> int:
        return self.index // self.order.n

    @property
    def epoch_progress(self) -> float:
        return self.index / self.order.n

    def next_indices(self) -> list[int]:
        start = self.index + self.rank * self.micro
        self.index += self.micro * self.world
        return [self.order.row(g) for g in range(start, start + self.micro)]

    def state_dict(self) -> dict:
        return {
            "index": self.index,
            "epoch": self.epoch,
            "seed": self.order.seed,
            "window": self.order.window,
            "n": self.order.n,
            "dataset": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "n": self.order.n,
            "seed": self.order.seed,
            "window": self.order.window,
            "dataset": self.fingerprint,
        }
        differ = [k for k, v in mine.items() if k in state and state[k] != v]
        if differ:
            raise UserError(
                f"data: the checkpoint's data position was taken on other data ({', '.join(differ)} differ: "
                f"saved {[state[k] for k in differ]}, now {[mine[k] for k in differ]}); resume with the same "
                "data, or set checkpoint.resume=never with a new output.dir"
            )
        self.index = int(state["index"])
