"""Weighted mixtures of training sources: which source each position of the global sample stream reads.

`data.train` as a list makes a mixture. Each source is tokenized into shards of its own (its own cache entry,
or its own directory of a prepared mixture), read in its own epochs (shuffled as one source is, `stream.py`,
from a seed of its own), and the mixture interleaves them by weight:

- The global stream is cut into blocks of `block` positions (2 / the smallest weight, at least 16: small, so
  even a short run reads each source close to its weight). After n = b x block positions, source k has
  been read `floor(w_k n)` times plus one for the sources with the largest remainders (so the counts add up to
  n): up to every block boundary each source is within one sample of its weight's share, and those counts
  are a formula of the block's index, not of a history. Inside a block the positions of the sources are a
  permutation seeded by (seed, block).
- So the source and the source's own position of global position g are a pure function of g and the seed
  (no sampler state): exact resume, resume on another world size, and one reader or many all see one stream.
- A source read more often than its rows (a small source with a large weight) starts its next epoch, with a
  fresh shuffle: it is upsampled, never exhausted. A mixture epoch is as many samples as all sources hold
  together (`train.epochs` counts those); within it each source is read about `w_k x total / rows_k` times.

Global row ids number the sources' rows one source after another (`MixedRows`), so the loader reads a row
by its id as it does for one source."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import fsio
from ..config import DataConfig, SourceConfig
from ..errors import UserError
from .shards import SplitStats
from .stream import GlobalOrder


def source_seed(seed: int, name: str) -> int:
    """The seed of one source's own shuffle: the data seed and the source's name."""
    h = hashlib.sha256(json.dumps([seed, "mixture-source", name]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def cumulative_counts(weights: np.ndarray, n: int) -> np.ndarray:
    """How many of the first n positions each source takes: floor(w n), plus one for the largest remainders
    (ties to the earlier source) until they add up to n. Non-decreasing in n (steps of >= 1/min(w))."""
    exact = weights * n
    base = np.floor(exact).astype(np.int64)
    short = n - int(base.sum())
    if short:
        order = np.lexsort((np.arange(len(weights)), -(exact - base)))
        base[order[:short]] += 1
    return base


class MixtureOrder:
    """Global stream position -> global row id, over the sources' own orders (`GlobalOrder`), by weight. Has
    what `SampleStream` reads of an order: `n` (samples per mixture epoch), `seed`, `window`, `row(g)`."""

    def __init__(self, orders: Sequence[GlobalOrder], weights: Sequence[float], seed: int, window: int):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.orders = list(orders)
        self.n = sum(o.n for o in self.orders)
        self.seed, self.window = seed, window
        # every source gets at least one position per block: counts never step back (see cumulative_counts)
        self.block = max(16, math.ceil(2 / float(self.weights.min())))
        self.offsets = np.concatenate([[0], np.cumsum([o.n for o in self.orders])[:-1]]).astype(np.int64)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of block b, each position's index within its source's reads)."""
        if self._cache is None or self._cache[0] != b:
            before = cumulative_counts(self.weights, b * self.block)
            counts = cumulative_counts(self.weights, (b + 1) * self.block) - before
            src = np.repeat(np.arange(len(counts)), counts)
            src = src[np.random.default_rng([self.seed, b, 0x6D6978]).permutation(len(src))]
            index = np.empty(len(src), dtype=np.int64)
            for k in range(len(counts)):
                at = np.flatnonzero(src == k)
                index[at] = before[k] + np.arange(len(at))
            self._cache = (b, src, index)
        return self._cache[1], self._cache[2]

    def source(self, g: int) -> tuple[int, int]:
        """(source, how many times it was read before) at global position g."""
        b, i = divmod(g, self.block)
        src, index = self._block(b)
        return int(src[i]), int(index[i])

    def row(self, g: int) -> int:
        k, i = self.source(g)
        return int(self.offsets[k]) + self.orders[k].row(i)


@dataclass
class MixedRows:
    """The sources' rows as one sequence of row ids (source after source): what the loader indexes."""

    names: list[str]
    parts: list  # each source's rows (a ShardSet)

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        self.stats = SplitStats.total(p.stats for p in self.parts)
        self.lists = self.parts[0].lists

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def __getitem__(self, i: int):
        k = self.source_of(i)
        return self.parts[k][i - int(self.starts[k])]


def describe(rows: MixedRows, weights: Sequence[float]) -> str:
    """Each source's share, and how often a mixture epoch reads each of its rows (> 1: upsampled)."""
    total = sum(weights)
    return "mixture: " + ", ".join(
        f"{name} {w / total:.2f} ({len(part):,} rows, each read {w / total * len(rows) / len(part):.2f}x per "
        "epoch)"
        for name, w, part in zip(rows.names, weights, rows.parts, strict=True)
    )


def tokens_by_source(rows: MixedRows, ids: Sequence[int], items: Sequence) -> dict[str, int]:
    """Tokens each source contributed to the rows `ids` (read as `items`)."""
    out = dict.fromkeys(rows.names, 0)
    for i, item in zip(ids, items, strict=True):
        exs = item if isinstance(item, list) else [item]
        out[rows.names[rows.source_of(i)]] += sum(len(e.input_ids) for e in exs)
    return out


@dataclass
class Part:
    """One source of a mixture: its name, weight (validation: None), and the one-source data config its
    shards are built from (the source's own format and task; `train` is that source alone)."""

    name: str
    weight: float | None
    cfg: DataConfig
    role: str  # "train" or "validation"

    @property
    def dirname(self) -> str:  # its directory in a prepared mixture
        return f"{self.role}-{self.name}"


def parts(cfg: DataConfig) -> list[Part]:
    """The sources of a mixture config as one-source configs. Validation: data.validation's sources, or (when
    it is unset) each training source's `val_fraction`, held out of it and scored under its name."""
    out = []
    held_out = cfg.val_fraction if cfg.validation is None else 0.0
    for role in ("train", "validation"):
        for src in cfg.sources(role):
            plain = src.model_copy(update=dict.fromkeys(SourceConfig.MIXING))  # what the shards are made of
            one = cfg.model_copy(
                update={
                    "train": plain,
                    "validation": None,
                    "val_fraction": held_out if role == "train" else 0.0,
                    "format": src.format or cfg.format,
                    "task": src.task or cfg.task,
                    "prepared": None,
                }
            )
            weight = (src.weight or 1.0) if role == "train" else None
            out.append(Part(src.label, weight, one, role))
    return out


MIXTURE_FILE = "mixture.json"


def mixture_fingerprint(names: list[str], weights: list[float], fingerprints: list[str]) -> str:
    body = json.dumps([names, weights, fingerprints]).encode()
    return hashlib.sha256(body).hexdigest()


def prepared_mixture(prepared: str | None) -> bool:
    """`data.prepared` names a mixture written by `dist-ft prepare` (local directories only)."""
    if not prepared or "://" in prepared:
        return False
    return (Path(prepared).expanduser() / MIXTURE_FILE).is_file()


def planned(cfg: DataConfig) -> list[Part]:
    """The mixture's parts: from the config, or (data.prepared) from the prepared mixture's `mixture.json`,
    each part then reading its own directory there."""
    if not prepared_mixture(cfg.prepared):
        return parts(cfg)
    root = Path(str(cfg.prepared)).expanduser()
    try:
        listed = json.loads((root / MIXTURE_FILE).read_text())["parts"]
        out = []
        for p in listed:
            one = cfg.model_copy(
                update={
                    "train": None,
                    "validation": None,
                    "task": p["task"],
                    "prepared": str(root / f"{p['role']}-{p['name']}"),
                }
            )
            out.append(Part(p["name"], p["weight"], one, p["role"]))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{root / MIXTURE_FILE}: not a mixture written by dist-ft prepare ({e}); re-run dist-ft prepare"
        ) from None


def write_plan(out: Path, plan: list[Part], counts: list[dict]) -> None:
    """`mixture.json` of a prepared mixture: its parts (name, role, weight, task, and each split's counts from
    the part's manifest), in order."""
    body = {
        "parts": [
            {"name": p.name, "role": p.role, "weight": p.weight, "task": p.cfg.task, "counts": c}
            for p, c in zip(plan, counts, strict=True)
        ]
    }
    fsio.write_atomic(out / MIXTURE_FILE, json.dumps(body, indent=2).encode())
