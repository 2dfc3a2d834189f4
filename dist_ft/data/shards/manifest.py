"""The typed contracts of a prepared dataset: what `manifest.json` and each `shard-N.json` hold.

`to_json` writes exactly the keys (and key order) earlier versions wrote, and `from_json` reads them, so
datasets prepared before these types existed still load, and a manifest written now reads the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...fsio import FileInfo, sha256_bytes

FORMAT = "dist_ft-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_FILES = ((".bin", "bin"), (".idx.npz", "idx"))  # each shard's files, and their key prefix in its meta
SPLITS = ("train", "validation")
SHARD_NAME = re.compile(r"shard-[0-9]{5,}")  # names come from a manifest that may be remote: never a path
COUNTERS = (
    "records",
    "examples",
    "tokens",
    "loss_tokens",
    "truncated",
    "dropped_overlong",
    "dropped_no_loss_after_truncation",
)


@dataclass(frozen=True)
class SplitStats:
    """What tokenizing produced: for one record, one shard (`counts`) or a whole split (`stats`). `rows` and
    `padding_fraction` describe a packed split only; they are None (and absent on disk) otherwise."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss_after_truncation: int = 0
    rows: int | None = None
    padding_fraction: float | None = None

    def __add__(self, other: SplitStats) -> SplitStats:
        """The counters summed; `rows` and `padding_fraction` belong to a whole split and are not carried."""
        return SplitStats(**{k: getattr(self, k) + getattr(other, k) for k in COUNTERS})

    @classmethod
    def total(cls, parts: Iterable[SplitStats]) -> SplitStats:
        return sum(parts, cls())

    @property
    def dropped(self) -> int:
        return self.dropped_overlong + self.dropped_no_loss_after_truncation

    def to_json(self) -> dict:
        out: dict = {k: getattr(self, k) for k in COUNTERS}
        for k in ("rows", "padding_fraction"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_json(cls, d: dict) -> SplitStats:
        return cls(
            **{k: d[k] for k in COUNTERS}, rows=d.get("rows"), padding_fraction=d.get("padding_fraction")
        )


@dataclass(frozen=True)
class ShardMeta:
    """One complete shard (`<split>/shard-N.json`, and its entry in the manifest)."""

    name: str  # "shard-00000"
    rows: int
    record_end: int  # index of the first source record after this shard (where a resumed prepare starts)
    bin: FileInfo
    idx: FileInfo
    counts: SplitStats

    def files(self) -> dict[str, FileInfo]:
        """{file name inside the split directory: its expected size and sha256}, .bin then .idx.npz."""
        return {f"{self.name}{ext}": getattr(self, k) for ext, k in SHARD_FILES}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "rows": self.rows,
            "record_end": self.record_end,
            **{
                f"{k}_{what}": getattr(getattr(self, k), what)
                for _, k in SHARD_FILES
                for what in ("bytes", "sha256")
            },
            "counts": self.counts.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict) -> ShardMeta:
        if not isinstance(d["name"], str) or not SHARD_NAME.fullmatch(d["name"]):
            raise ValueError(
                f"shard name {d['name']!r} is not of the form shard-NNNNN (a file name inside the split's "
                "directory)"
            )
        if not all(isinstance(d[f"{k}_sha256"], str) for _, k in SHARD_FILES):
            raise ValueError(f"shard {d['name']} lacks the sha256 of a file")
        return cls(
            d["name"],
            d["rows"],
            d["record_end"],
            **{k: FileInfo(d[f"{k}_bytes"], d[f"{k}_sha256"]) for _, k in SHARD_FILES},
            counts=SplitStats.from_json(d["counts"]),
        )


@dataclass(frozen=True)
class SplitManifest:
    stats: SplitStats
    shards: list[ShardMeta]

    def to_json(self) -> dict:
        return {"stats": self.stats.to_json(), "shards": [m.to_json() for m in self.shards]}

    @classmethod
    def from_json(cls, d: dict) -> SplitManifest:
        return cls(SplitStats.from_json(d["stats"]), [ShardMeta.from_json(m) for m in d["shards"]])


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what the shards were made from (`key`, see identity.dataset_key) and every split's
    shards."""

    format: str
    version: int
    key: dict
    dtype: str  # of the token ids: "uint16" or "uint32"
    splits: dict[str, SplitManifest]
    prepare_seconds: float
    tokens_per_s: int
    # what the task's scan found in the training records (e.g. the label set)
    meta: dict = field(default_factory=dict)

    @property
    def packing(self) -> bool:
        return self.key["packing"]

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "version": self.version,
            "key": self.key,
            "dtype": self.dtype,
            "splits": {s: info.to_json() for s, info in self.splits.items()},
            "prepare_seconds": self.prepare_seconds,
            "tokens_per_s": self.tokens_per_s,
            **({"meta": self.meta} if self.meta else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        bad = [s for s in d["splits"] if s not in SPLITS]
        if bad:
            raise ValueError(f"split name {bad[0]!r} is not one of {', '.join(SPLITS)}")
        return cls(
            d["format"],
            d["version"],
            d["key"],
            d["dtype"],
            {s: SplitManifest.from_json(i) for s, i in d["splits"].items()},
            d["prepare_seconds"],
            d["tokens_per_s"],
            d.get("meta") or {},
        )


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path}: no manifest; this is not a prepared dataset (run dist-ft prepare CONFIG --out {root})"
        ) from None
    except ValueError as e:
        raise UserError(f"{path}: unreadable manifest ({e}); re-run dist-ft prepare") from None
    return parse_manifest(data, str(path))


def parse_manifest(data, where: str) -> Manifest:
    """The manifest in parsed JSON `data`, checked before any file it names is opened or written: names are
    plain shard and split names, never paths (`..`, `/`), whoever wrote the manifest."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UserError(f"{where}: not a dist_ft shard manifest of version {VERSION}; re-run dist-ft prepare")
    try:
        return Manifest.from_json(data)
    except ValueError as e:
        raise UserError(
            f"{where}: {e}; the manifest is damaged or was not written by dist-ft prepare: re-run dist-ft "
            "prepare"
        ) from None
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{where}: unreadable manifest (missing or malformed {e}); re-run dist-ft prepare"
        ) from None


def fingerprint(manifest: Manifest, split: str = "train") -> str:
    """Identity of one split's contents (the checksums of its shards), stored with the data position."""
    shas = (m.bin.sha256 or "" for m in manifest.splits[split].shards)  # never None: see ShardMeta.from_json
    return sha256_bytes("".join(shas).encode())[:16]
