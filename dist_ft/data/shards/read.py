"""Reading shards: one split's rows, memory-mapped, after checking each shard file against the manifest."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ... import fsio
from ...errors import UserError
from ..chat import IGNORE, Example
from .manifest import MANIFEST, Manifest, SplitStats

_FIX = "restore it or re-run dist-ft prepare"


def _check(path: Path, want: fsio.FileInfo, root: Path, verify: bool) -> None:
    """Raise naming the shard file when it is missing, has another size, or (verify) another sha256."""
    why = fsio.mismatch(path, want, verify_sha=verify)
    if why is None:
        return
    if why == "missing":
        raise UserError(f"{path}: shard listed in {root / MANIFEST} is missing; {_FIX}")
    size = path.stat().st_size
    if size != want.bytes:
        raise UserError(
            f"{path}: shard is {size} bytes, the manifest says {want.bytes} (truncated or replaced); {_FIX}"
        )
    raise UserError(f"{path}: shard {why}; {_FIX}")  # "checksum mismatch (corrupt)"


class ShardSet:
    """The rows of one split, memory-mapped; `items[i]` is row i (list[Example] packed or grouped (a task's
    `group` > 1: preference pairs), Example otherwise). `refs`, once set, holds a value per example (reference
    log-probs), in storage order, carried by each Example read (`with_refs` gives such a copy)."""

    def __init__(self, root: Path, manifest: Manifest, split: str, verify: bool = True, group: int = 1):
        info = manifest.splits[split]
        self.stats: SplitStats = info.stats
        self.packing: bool = manifest.packing
        self.lists: bool = manifest.packing or group > 1
        self.refs: np.ndarray | None = None
        dtype = np.dtype(manifest.dtype)
        self._tokens, self._mask, self._ex, self._rows = [], [], [], []
        for meta in info.shards:
            for file, want in meta.files().items():
                _check(root / split / file, want, root, verify)
            bin_path, idx_path = root / split / f"{meta.name}.bin", root / split / f"{meta.name}.idx.npz"
            with np.load(idx_path, allow_pickle=False) as idx:
                ex, rows = idx["example_offsets"], idx["row_offsets"]
            n_tok = int(ex[-1])
            self._tokens.append(
                np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, dtype)
            )
            self._mask.append(
                np.memmap(bin_path, dtype=np.uint8, mode="r", offset=n_tok * dtype.itemsize, shape=(n_tok,))
                if n_tok
                else np.zeros(0, np.uint8)
            )
            self._ex.append(ex)
            self._rows.append(rows)
        self.shard_rows = [len(r) - 1 for r in self._rows]
        self._starts = np.cumsum([0] + self.shard_rows)
        self._ex_starts = np.cumsum([0] + [len(e) - 1 for e in self._ex])
        self.n_examples = int(self._ex_starts[-1])

    def with_refs(self, refs: np.ndarray) -> ShardSet:
        """This split's rows, whose examples carry `refs` (one value per example, in storage order); the
        memory maps are shared, this set is left as it was."""
        out = copy.copy(self)
        out.refs = refs
        return out

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _example(self, s: int, e: int) -> Example:
        a, b = int(self._ex[s][e]), int(self._ex[s][e + 1])
        ids = self._tokens[s][a:b].astype(np.int64)
        labels = np.where(self._mask[s][a:b] != 0, ids, IGNORE)
        ref = None if self.refs is None else float(self.refs[int(self._ex_starts[s]) + e])
        return Example(ids.tolist(), labels.tolist(), ref)

    def _locate(self, i: int) -> tuple[int, int, int]:
        """(shard, first example in it, end example) of row i."""
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        r = i - int(self._starts[s])
        return s, int(self._rows[s][r]), int(self._rows[s][r + 1])

    def example_ids(self, i: int) -> range:
        """Indices (in storage order over the split) of row i's examples."""
        s, a, b = self._locate(i)
        return range(int(self._ex_starts[s]) + a, int(self._ex_starts[s]) + b)

    def __getitem__(self, i: int):
        s, a, b = self._locate(i)
        examples = [self._example(s, e) for e in range(a, b)]
        return examples if self.lists else examples[0]
