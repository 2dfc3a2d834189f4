"""Writing shards: `prepare` tokenizes a config's sources (see pool.py), packs the examples into rows and
writes them shard by shard into `<out>.partial/`, resuming after the last complete shard of an interrupted
prepare; the manifest is written last and the directory renamed into place."""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ... import fsio
from ...config import DataConfig
from ...errors import UserError
from ...faults import NONE, Faults
from ...runlock import FileLock
from ..chat import IGNORE
from ..packing import pack
from . import pool
from .identity import dataset_key
from .manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    Manifest,
    ShardMeta,
    SplitManifest,
    SplitStats,
    read_manifest,
)


class _ShardWriter:
    """Buffers examples of one split; `flush` packs them into rows and writes one shard. Every `group`
    consecutive examples (a preference pair) stay together in one row; a packed row holds `group` x `seq_len`
    tokens."""

    def __init__(self, split_dir: Path, dtype: np.dtype, seq_len: int, packing: bool, group: int = 1):
        self.dir, self.dtype, self.seq_len, self.packing, self.group = (
            split_dir,
            dtype,
            seq_len,
            packing,
            group,
        )
        self.ids: list[bytes] = []
        self.masks: list[bytes] = []
        self.tokens = 0
        self.counts = SplitStats()

    def add(self, arrays: list[tuple[bytes, bytes]], counts: SplitStats) -> None:
        for ids, mask in arrays:
            self.ids.append(ids)
            self.masks.append(mask)
            self.tokens += len(mask)
        self.counts += counts

    def flush(self, number: int, record_end: int) -> ShardMeta:
        ids = [np.frombuffer(b, dtype=np.uint32) for b in self.ids]
        masks = [np.frombuffer(b, dtype=np.uint8) for b in self.masks]
        lengths = [len(m) for m in masks]
        g = self.group
        units = [sum(lengths[u * g : (u + 1) * g]) for u in range(len(lengths) // g)]
        rows = pack(units, g * self.seq_len) if self.packing else [[u] for u in range(len(units))]
        order = [u * g + k for row in rows for u in row for k in range(g)]  # examples stored row by row
        row_offsets = np.cumsum([0] + [g * len(r) for r in rows], dtype=np.int64)
        ex_offsets = np.cumsum([0] + [lengths[i] for i in order], dtype=np.int64)
        tokens = (
            np.concatenate([ids[i] for i in order]).astype(self.dtype) if order else np.zeros(0, self.dtype)
        )
        mask = np.concatenate([masks[i] for i in order]) if order else np.zeros(0, np.uint8)
        name = f"shard-{number:05d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, example_offsets=ex_offsets, row_offsets=row_offsets)
        meta = ShardMeta(
            name,
            len(rows),
            record_end,
            bin=fsio.write_atomic(self.dir / f"{name}.bin", tokens.tobytes() + mask.tobytes()),
            idx=fsio.write_atomic(self.dir / f"{name}.idx.npz", buf.getvalue()),
            counts=self.counts,
        )
        # the shard is complete once this exists
        fsio.write_atomic(self.dir / f"{name}.json", json.dumps(meta.to_json()))
        self.ids, self.masks, self.tokens, self.counts = [], [], 0, SplitStats()
        return meta


def _kept_shards(split_dir: Path) -> list[ShardMeta]:
    """Complete shards an interrupted prepare left (meta written, sizes and checksums right), in order."""
    metas = []
    for n in range(1 << 30):
        p = split_dir / f"shard-{n:05d}.json"
        if not p.is_file():
            break
        meta = ShardMeta.from_json(json.loads(p.read_text()))
        if fsio.first_mismatch(split_dir, meta.files()) is not None:
            break
        metas.append(meta)
    return metas


def _prepare_split(
    cfg: DataConfig, tok, task, split: str, split_dir: Path, dtype, log, progress: bool | None, faults: Faults
) -> SplitManifest | None:
    src, records = pool.split_records(cfg, split)
    metas = _kept_shards(split_dir)
    if metas:
        log(f"prepare {split}: resuming after {len(metas)} complete shard(s) of an interrupted prepare")
    start = metas[-1].record_end if metas else 0
    records = (r for r in records if r[0] >= start)
    writer = _ShardWriter(split_dir, dtype, cfg.max_seq_len, cfg.packing, task.group)
    seen_any = bool(metas)
    last = start - 1
    from tqdm import tqdm

    with pool.encoded(cfg, tok, task, records) as (results, procs):
        bar = tqdm(
            desc=f"prepare {split}",
            unit=" records",
            disable=None if progress is None else not progress,
            mininterval=1.0,
        )
        t0 = time.perf_counter()
        tokens = 0
        try:
            for batch in results:
                for i, arrays, counts in batch:
                    seen_any = True
                    last = i
                    writer.add(arrays, counts)
                    tokens += counts.tokens
                    if writer.tokens >= cfg.shard_tokens:
                        metas.append(writer.flush(len(metas), i + 1))
                        faults.after_shard(len(metas))
                bar.update(len(batch))
                bar.set_postfix_str(
                    f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s", refresh=False
                )
        finally:
            bar.close()
    if writer.counts.records:
        metas.append(writer.flush(len(metas), last + 1))
    if not seen_any:
        if split == "validation" and cfg.validation is None:
            return None  # val_fraction held out no record of a tiny source
        raise UserError(
            f"{src.path}: no records (the file is empty); add data or point the config at another file"
        )
    totals = SplitStats.total(m.counts for m in metas)
    rows = sum(m.rows for m in metas)
    if cfg.packing:
        totals = replace(
            totals,
            rows=rows,
            padding_fraction=round(1 - totals.tokens / max(1, rows * task.group * cfg.max_seq_len), 4),
        )
    dt = time.perf_counter() - t0
    log(
        f"prepare {split}: {totals.records:,} records -> {totals.examples:,} examples, {rows:,} rows, "
        f"{totals.tokens:,} tokens in {len(metas)} shard(s); {dt:.1f} s, {tokens / max(dt, 1e-9):,.0f} "
        f"tokens/s ({procs} process{'es' if procs > 1 else ''})"
    )
    return SplitManifest(totals, metas)


STALE_S = (
    300.0  # a lock with no heartbeat this long (another host's, or a suspended one) belongs to a dead prepare
)
WAIT_S = 6 * 3600.0  # how long a second prepare waits for a live one before it gives up


def prepare(
    cfg: DataConfig,
    tok,
    out: Path,
    task,
    log=print,
    progress: bool | None = True,
    wait_s: float = WAIT_S,
    faults: Faults = NONE,
) -> Manifest:
    """Tokenize (`task.examples` per record), pack and write the train (and validation) shards of `cfg` into
    `out`; returns the manifest.
    Reuses `out` when it already holds these shards; refuses to replace different ones. Concurrent prepares of
    one directory (ranks, nodes, jobs) take turns on `<out>.lock` (O_EXCL + heartbeat, as the run lock:
    `flock` is absent or node-local on many NFS/Lustre mounts): one writes, the others wait for it and reuse
    its shards."""
    _refuse_foreign(out)
    lock = FileLock(out.parent / f"{out.name}.lock", STALE_S, f"{STALE_S / 60:g} min")
    lock.wait(f"prepare {out}", log, wait_s)
    if lock.note:
        log(f"prepare {out}: {lock.note}")
    try:
        return _prepare_locked(cfg, tok, out, task, log, progress, lock, faults)
    finally:
        lock.release()


def _refuse_foreign(out: Path) -> None:
    """`out` must be new, empty, or a prepared dataset: prepare renames its finished directory onto it, so
    anything else there would be in the way (and is never deleted)."""
    if out.exists() and not (out / MANIFEST).is_file():
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        if held is None or held:
            what = (
                "is a file"
                if held is None
                else f"holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}"
            )
            raise UserError(
                f"{out}: exists and is not a prepared dataset ({what}); nothing was changed: give dist-ft "
                "prepare a new or empty directory"
            )


def _prepare_locked(
    cfg: DataConfig, tok, out: Path, task, log, progress: bool | None, lock: FileLock, faults: Faults
) -> Manifest:
    key = dataset_key(cfg, tok)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.key["sha256"] == key["sha256"]:
            log(f"prepare: {out} already holds these shards (key {key['sha256'][:12]}); nothing to do")
            return manifest
        raise UserError(
            f"{out}: already holds shards prepared from other data or settings; choose another output "
            "directory or delete it"
        )
    partial = out.with_name(f"{out.name}.partial")
    if partial.exists():
        try:
            same = json.loads((partial / "key.json").read_text())["sha256"] == key["sha256"]
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    fsio.write_atomic(partial / "key.json", json.dumps(key))
    dtype = np.uint16 if len(tok) <= 1 << 16 else np.uint32
    t0 = time.perf_counter()
    meta = task.scan((w, r) for _, w, r in pool.split_records(cfg, "train")[1]) if task.scan else {}
    # its examples get what its scan found (e.g. the label set); the manifest keeps it
    task = task.with_meta(meta)
    splits: dict[str, SplitManifest] = {}
    for split in ("train", "validation"):
        if split == "validation" and cfg.validation is None and cfg.val_fraction == 0:
            continue
        done = _prepare_split(cfg, tok, task, split, partial / split, dtype, log, progress, faults)
        if done is not None:
            splits[split] = done
    train = splits["train"].stats
    if train.examples == 0:
        shutil.rmtree(partial)
        raise _no_examples(cfg, tok, task, train)
    dt = time.perf_counter() - t0
    tokens = sum(s.stats.tokens for s in splits.values())
    manifest = Manifest(
        FORMAT, VERSION, key, np.dtype(dtype).name, splits, round(dt, 3), round(tokens / max(dt, 1e-9)), meta
    )
    fsio.write_atomic(partial / MANIFEST, json.dumps(manifest.to_json(), indent=1))
    if lock.check():  # suspended past the stale age: the prepare that took over publishes (the same shards)
        raise UserError(
            f"prepare {out}: this prepare lost its lock ({lock.lost}); the one that took it over writes "
            "these shards; retry to reuse them"
        )
    (partial / "key.json").unlink()
    partial.rename(out)
    fsio.fsync(out.parent)
    return manifest


def _no_examples(cfg: DataConfig, tok, task, stats: SplitStats) -> UserError:
    """Why no record of the train split gave an example, told on the first one (every record gave none)."""
    src, records = pool.split_records(cfg, "train")
    _, where, rec = next(records, (0, str(src.path), None))
    whole, _ = (
        task.examples(rec, where, cfg.model_copy(update={"max_seq_len": 1 << 40}), tok)
        if rec
        else ([], SplitStats())
    )  # untruncated
    n = len(whole[0].input_ids) if whole else 0
    first = next((p for p, label in enumerate(whole[0].labels) if label != IGNORE), None) if whole else None
    limit, none = (
        cfg.max_seq_len,
        (
            f"no record of {src.path} gave a training example ({stats.records:,} records: "
            f"{stats.dropped_overlong:,} longer than data.max_seq_len and dropped, "
            f"{stats.dropped_no_loss_after_truncation:,} with no trained token left after truncation)"
        ),
    )
    if first is not None and first >= limit:
        return UserError(
            f"{where}: its first trained (assistant) token is at position {first} >= data.max_seq_len "
            f"{limit}, so nothing of the answer fits; {none}: raise data.max_seq_len above {first}, or "
            "shorten the turns before the answer"
        )
    if n > limit:
        return UserError(
            f"{where}: example is {n:,} tokens > data.max_seq_len {limit} and data.overlong: drop removed "
            f"it; {none}: set data.overlong: truncate (keeps its first {limit} tokens) or raise "
            f"data.max_seq_len to {n}"
        )
    return UserError(f"{where}: gave no training example; {none}: check the records and data.task")
