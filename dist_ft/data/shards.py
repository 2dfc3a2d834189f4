"""Token shards: written once by `dist-ft prepare` (or on the fly by `train`), memory-mapped by every rank.

Layout of a prepared dataset directory:

    manifest.json                      tokenizer name + hash, template hash, seq len, settings, counts,
                                       every shard with its size and sha256 (written last)
    train/shard-00000.bin              token ids (uint16 if the vocabulary fits, else uint32), then one
                                       uint8 loss mask per token (1 = the token is a training target)
    train/shard-00000.idx.npz          example_offsets (token offset of each example) and row_offsets
                                       (first example of each row: a packed row, or one example unpacked)
    validation/...                     the same, when the config has a validation source or val_fraction

A prepare builds into `<dir>.partial/`; each shard's files are fsynced and renamed, then its
`shard-N.json` is written: an interrupted prepare resumes after its last complete shard (records are
read again but not re-tokenized). The manifest is written once every shard is complete, then the directory
is renamed into place, so a manifest never points at a partial shard. A lock file beside the directory
makes concurrent prepares of it (ranks, jobs) take turns: the first writes, the others reuse.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import DataConfig, SourceConfig
from ..errors import UserError
from .chat import IGNORE, Example, tokenize_conversation, tokenize_text
from .formats import to_conversation
from .packing import pack
from .sources import iter_records

FORMAT = "dist_ft-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
_BATCH = 256  # records per worker task
_POOL_AFTER = 2048  # smaller sources are tokenized in-process: a pool costs more than it saves
SHARD_FILES = ((".bin", "bin"), (".idx.npz", "idx"))  # each shard's files, and their key prefix in its meta
COUNTERS = ("records", "examples", "tokens", "loss_tokens", "truncated", "dropped_overlong", "dropped_no_loss_after_truncation")


# ---------------------------------------------------------------- identity of what shards depend on

def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _intact(path: Path, meta: dict, k: str) -> bool:
    """Whether a shard file is there with the size and sha256 its meta records."""
    return path.is_file() and path.stat().st_size == meta[f"{k}_bytes"] and file_sha256(path) == meta[f"{k}_sha256"]


def tokenizer_identity(tok) -> dict:
    """Name, content hash (vocabulary, merges, added/special tokens) and chat-template hash of a tokenizer."""
    body = tok.backend_tokenizer.to_str() + json.dumps(tok.special_tokens_map, sort_keys=True, default=str)
    return {"name": tok.name_or_path, "sha256": _sha256_bytes(body.encode()), "vocab_size": len(tok),
            "template_sha256": _sha256_bytes((tok.chat_template or "").encode())}


def _source_identity(src: SourceConfig | None) -> dict | None:
    """What a source is: for local files their size and mtime (a changed file gets new shards)."""
    if src is None:
        return None
    ident = src.model_dump()
    path = Path(src.path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        ident["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return ident


SETTINGS = ("max_seq_len", "packing", "task", "format", "overlong", "shard_tokens")


def dataset_key(cfg: DataConfig, tok) -> dict:
    """Everything the shard contents depend on; its hash names the on-the-fly cache entry."""
    key = {"format_version": VERSION, "tokenizer": tokenizer_identity(tok), **{k: getattr(cfg, k) for k in SETTINGS},
           "train": _source_identity(cfg.train), "validation": _source_identity(cfg.validation),
           "val_fraction": cfg.val_fraction if cfg.validation is None else 0.0, "split_seed": cfg.seed}
    key["sha256"] = _sha256_bytes(json.dumps(key, sort_keys=True).encode())
    return key


def cache_entry(cfg: DataConfig, tok) -> Path:
    """Where `train` builds (and `dist-ft prepare` without --out writes) the shards of this config."""
    return cfg.cache_path() / "shards" / dataset_key(cfg, tok)["sha256"][:16]


def check_compatible(manifest: dict, where: str, cfg: DataConfig, tok) -> None:
    """Shards must come from this run's tokenizer, template and sequence settings: say which one differs."""
    mine = tokenizer_identity(tok)
    theirs = manifest["key"]["tokenizer"]
    if theirs["sha256"] != mine["sha256"]:
        raise UserError(f"{where}: shards were tokenized with another tokenizer ('{theirs['name']}', hash {theirs['sha256'][:12]}) "
                        f"than this run's ('{mine['name']}', hash {mine['sha256'][:12]}); re-run dist-ft prepare with this model.path")
    if theirs["template_sha256"] != mine["template_sha256"]:
        raise UserError(f"{where}: shards were rendered with another chat template (hash {theirs['template_sha256'][:12]}, "
                        f"this run {mine['template_sha256'][:12]}); re-run dist-ft prepare with this model.chat_template")
    for k in ("max_seq_len", "packing", "task"):
        if manifest["key"][k] != getattr(cfg, k):
            raise UserError(f"{where}: shards were prepared with data.{k}={manifest['key'][k]!r}, this run has "
                            f"data.{k}={getattr(cfg, k)!r}; set data.{k}={manifest['key'][k]!r} or re-run dist-ft prepare")


# ---------------------------------------------------------------- tokenizing records (runs in workers)

_WORKER: dict = {}


def _init_worker(cfg: DataConfig, tok) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER.update(cfg=cfg, tok=tok)


def tokenize_record(rec: dict, where: str, cfg: DataConfig, tok) -> tuple[list[Example], dict]:
    """One record -> its examples (several for long raw text) and the counters it changes."""
    counts = dict.fromkeys(COUNTERS, 0)
    counts["records"] = 1
    conv = to_conversation(rec, cfg.format, where)
    if conv.text is not None:
        if cfg.task == "sft":
            raise UserError(f"{where}: raw 'text' record in an SFT run; set data.task: pretrain for continued pretraining, or use chat records")
        examples = tokenize_text(tok, conv.text, cfg.max_seq_len)
    else:
        ex = tokenize_conversation(tok, conv, where)
        if cfg.task == "pretrain":  # chat data as plain text: loss everywhere
            ex = Example(ex.input_ids, list(ex.input_ids))
        examples = [ex]
        if len(ex.input_ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                counts["dropped_overlong"] = 1
                examples = []
            else:
                ex = Example(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
                counts["truncated"] = 1
                if ex.n_loss == 0:
                    counts["dropped_no_loss_after_truncation"] = 1
                    examples = []
                else:
                    examples = [ex]
    counts["examples"] = len(examples)
    counts["tokens"] = sum(len(e.input_ids) for e in examples)
    counts["loss_tokens"] = sum(e.n_loss for e in examples)
    return examples, counts


def _encode(batch: list[tuple[int, str, dict]], cfg: DataConfig, tok) -> list[tuple[int, list[tuple[bytes, bytes]], dict]]:
    out = []
    for i, where, rec in batch:
        examples, counts = tokenize_record(rec, where, cfg, tok)
        arrays = [(np.asarray(e.input_ids, dtype=np.uint32).tobytes(),
                   (np.asarray(e.labels) != IGNORE).astype(np.uint8).tobytes()) for e in examples]
        out.append((i, arrays, counts))
    return out


def _encode_in_worker(batch):
    return _encode(batch, _WORKER["cfg"], _WORKER["tok"])


# ---------------------------------------------------------------- writing

def _write_atomic(path: Path, data: bytes) -> dict:
    """Write, fsync, rename; returns the size and sha256 of what was written (hashed in memory, not read back)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return {"bytes": len(data), "sha256": _sha256_bytes(data)}


class _ShardWriter:
    """Buffers examples of one split; `flush` packs them into rows and writes one shard."""

    def __init__(self, split_dir: Path, dtype: np.dtype, seq_len: int, packing: bool):
        self.dir, self.dtype, self.seq_len, self.packing = split_dir, dtype, seq_len, packing
        self.ids: list[bytes] = []
        self.masks: list[bytes] = []
        self.tokens = 0
        self.counts = dict.fromkeys(COUNTERS, 0)

    def add(self, arrays: list[tuple[bytes, bytes]], counts: dict) -> None:
        for ids, mask in arrays:
            self.ids.append(ids)
            self.masks.append(mask)
            self.tokens += len(mask)
        for k, v in counts.items():
            self.counts[k] += v

    def flush(self, number: int, record_end: int) -> dict:
        ids = [np.frombuffer(b, dtype=np.uint32) for b in self.ids]
        masks = [np.frombuffer(b, dtype=np.uint8) for b in self.masks]
        lengths = [len(m) for m in masks]
        rows = pack(lengths, self.seq_len) if self.packing else [[i] for i in range(len(lengths))]
        order = [i for row in rows for i in row]  # examples stored row by row
        row_offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        ex_offsets = np.cumsum([0] + [lengths[i] for i in order], dtype=np.int64)
        tokens = np.concatenate([ids[i] for i in order]).astype(self.dtype) if order else np.zeros(0, self.dtype)
        mask = np.concatenate([masks[i] for i in order]) if order else np.zeros(0, np.uint8)
        name = f"shard-{number:05d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, example_offsets=ex_offsets, row_offsets=row_offsets)
        written = {"bin": _write_atomic(self.dir / f"{name}.bin", tokens.tobytes() + mask.tobytes()),
                   "idx": _write_atomic(self.dir / f"{name}.idx.npz", buf.getvalue())}
        meta = {"name": name, "rows": len(rows), "record_end": record_end,
                **{f"{k}_{what}": v for k, w in written.items() for what, v in w.items()}, "counts": self.counts}
        _write_atomic(self.dir / f"{name}.json", json.dumps(meta).encode())  # the shard is complete once this exists
        self.ids, self.masks, self.tokens, self.counts = [], [], 0, dict.fromkeys(COUNTERS, 0)
        return meta


def _held_out(seed: int, i: int, fraction: float) -> bool:
    """Deterministic per-record validation split that needs no record count (works for streams)."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


def _split_records(cfg: DataConfig, split: str) -> tuple[SourceConfig, Iterator[tuple[int, str, dict]]]:
    if split == "validation" and cfg.validation is not None:
        return cfg.validation, ((i, w, r) for i, (w, r) in enumerate(iter_records(cfg.validation)))
    src, frac = cfg.train, (cfg.val_fraction if cfg.validation is None else 0.0)
    want = split == "validation"
    return src, ((i, w, r) for i, (w, r) in enumerate(iter_records(src)) if frac == 0 or _held_out(cfg.seed, i, frac) == want)


def _kept_shards(split_dir: Path) -> list[dict]:
    """Complete shards an interrupted prepare left (meta written, sizes and checksums right), in order."""
    metas = []
    for n in range(1 << 30):
        p = split_dir / f"shard-{n:05d}.json"
        if not p.is_file():
            break
        meta = json.loads(p.read_text())
        if not all(_intact(split_dir / f"{meta['name']}{ext}", meta, k) for ext, k in SHARD_FILES):
            break
        metas.append(meta)
    return metas


def _ordered_map(pool, batches, depth: int):
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


def _prepare_split(cfg: DataConfig, tok, split: str, split_dir: Path, dtype, log, progress: bool | None) -> dict | None:
    src, records = _split_records(cfg, split)
    metas = _kept_shards(split_dir)
    if metas:
        log(f"prepare {split}: resuming after {len(metas)} complete shard(s) of an interrupted prepare")
    start = metas[-1]["record_end"] if metas else 0
    records = (r for r in records if r[0] >= start)
    writer = _ShardWriter(split_dir, dtype, cfg.max_seq_len, cfg.packing)
    seen_any = bool(metas)
    last = start - 1

    def batches():
        while batch := list(islice(records, _BATCH)):
            yield batch

    gen = batches()
    head = list(islice(gen, max(1, _POOL_AFTER // _BATCH)))
    procs = _num_proc(cfg.num_proc)
    pool = None
    if len(head) == _POOL_AFTER // _BATCH and procs > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(procs, _init_worker, (cfg, tok))
        results = _ordered_map(pool, (b for part in (head, gen) for b in part), depth=4 * procs)
    else:
        results = (_encode(b, cfg, tok) for part in (head, gen) for b in part)
    from tqdm import tqdm

    bar = tqdm(desc=f"prepare {split}", unit=" records", disable=None if progress is None else not progress, mininterval=1.0)
    t0 = time.perf_counter()
    tokens = 0
    try:
        for encoded in results:
            for i, arrays, counts in encoded:
                seen_any = True
                last = i
                writer.add(arrays, counts)
                tokens += counts["tokens"]
                if writer.tokens >= cfg.shard_tokens:
                    metas.append(writer.flush(len(metas), i + 1))
                    _kill_for_tests(len(metas))
            bar.update(len(encoded))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if writer.counts["records"]:
        metas.append(writer.flush(len(metas), last + 1))
    if not seen_any:
        if split == "validation" and cfg.validation is None:
            return None  # val_fraction held out no record of a tiny source
        raise UserError(f"{src.path}: no records (the file is empty); add data or point the config at another file")
    totals = {k: sum(m["counts"][k] for m in metas) for k in COUNTERS}
    rows = sum(m["rows"] for m in metas)
    if cfg.packing:
        totals["rows"] = rows
        totals["padding_fraction"] = round(1 - totals["tokens"] / max(1, rows * cfg.max_seq_len), 4)
    dt = time.perf_counter() - t0
    log(f"prepare {split}: {totals['records']:,} records -> {totals['examples']:,} examples, {rows:,} rows, "
        f"{totals['tokens']:,} tokens in {len(metas)} shard(s); {dt:.1f} s, {tokens / max(dt, 1e-9):,.0f} tokens/s "
        f"({procs if pool else 1} process{'es' if pool else ''})")
    return {"stats": totals, "shards": metas}


def prepare(cfg: DataConfig, tok, out: Path, log=print, progress: bool | None = True) -> dict:
    """Tokenize, pack and write the train (and validation) shards of `cfg` into `out`; returns the manifest.
    Reuses `out` when it already holds these shards; refuses to replace different ones. Concurrent
    prepares of one directory (ranks, jobs) take turns on a lock file: one writes, the others reuse."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(cfg, tok, out, log, progress)


def _prepare_locked(cfg: DataConfig, tok, out: Path, log, progress: bool | None) -> dict:
    key = dataset_key(cfg, tok)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest["key"]["sha256"] == key["sha256"]:
            log(f"prepare: {out} already holds these shards (key {key['sha256'][:12]}); nothing to do")
            return manifest
        raise UserError(f"{out}: already holds shards prepared from other data or settings; choose another output directory or delete it")
    partial = out.with_name(f"{out.name}.partial")
    if partial.exists():
        try:
            same = json.loads((partial / "key.json").read_text())["sha256"] == key["sha256"]
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _write_atomic(partial / "key.json", json.dumps(key).encode())
    dtype = np.uint16 if len(tok) <= 1 << 16 else np.uint32
    t0 = time.perf_counter()
    splits = {}
    for split in ("train", "validation"):
        if split == "validation" and cfg.validation is None and cfg.val_fraction == 0:
            continue
        done = _prepare_split(cfg, tok, split, partial / split, dtype, log, progress)
        if done is not None:
            splits[split] = done
    train = splits["train"]["stats"]
    if train["examples"] == 0:
        shutil.rmtree(partial)
        raise UserError(f"{cfg.train.path}: no training examples left after filtering ({train}); "
                        "raise data.max_seq_len or set data.overlong: truncate")
    dt = time.perf_counter() - t0
    tokens = sum(s["stats"]["tokens"] for s in splits.values())
    manifest = {"format": FORMAT, "version": VERSION, "key": key, "dtype": np.dtype(dtype).name, "splits": splits,
                "prepare_seconds": round(dt, 3), "tokens_per_s": round(tokens / max(dt, 1e-9))}
    _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
    (partial / "key.json").unlink()
    partial.rename(out)
    return manifest


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest; this is not a prepared dataset (run dist-ft prepare CONFIG --out {root})") from None
    except ValueError as e:
        raise UserError(f"{path}: unreadable manifest ({e}); re-run dist-ft prepare") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path}: not a dist_ft shard manifest of version {VERSION}; re-run dist-ft prepare")
    return manifest


def fingerprint(manifest: dict, split: str = "train") -> str:
    """Identity of one split's contents (the checksums of its shards), stored with the data position."""
    return _sha256_bytes("".join(m["bin_sha256"] for m in manifest["splits"][split]["shards"]).encode())[:16]


# ---------------------------------------------------------------- reading

class ShardSet:
    """The rows of one split, memory-mapped; `items[i]` is row i (list[Example] packed, Example unpacked)."""

    def __init__(self, root: Path, manifest: dict, split: str, verify: bool = True):
        info = manifest["splits"][split]
        self.stats, self.packing = info["stats"], manifest["key"]["packing"]
        dtype = np.dtype(manifest["dtype"])
        self._tokens, self._mask, self._ex, self._rows = [], [], [], []
        for meta in info["shards"]:
            paths = {k: root / split / f"{meta['name']}{ext}" for ext, k in SHARD_FILES}
            for k, p in paths.items():
                if not p.is_file():
                    raise UserError(f"{p}: shard listed in {root / MANIFEST} is missing; restore it or re-run dist-ft prepare")
                if p.stat().st_size != meta[f"{k}_bytes"]:
                    raise UserError(f"{p}: shard is {p.stat().st_size} bytes, the manifest says {meta[f'{k}_bytes']} "
                                    "(truncated or replaced); restore it or re-run dist-ft prepare")
                if verify and file_sha256(p) != meta[f"{k}_sha256"]:
                    raise UserError(f"{p}: shard checksum mismatch (corrupt); restore it or re-run dist-ft prepare")
            with np.load(paths["idx"], allow_pickle=False) as idx:
                ex, rows = idx["example_offsets"], idx["row_offsets"]
            n_tok = int(ex[-1])
            self._tokens.append(np.memmap(paths["bin"], dtype=dtype, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, dtype))
            self._mask.append(np.memmap(paths["bin"], dtype=np.uint8, mode="r", offset=n_tok * dtype.itemsize, shape=(n_tok,))
                              if n_tok else np.zeros(0, np.uint8))
            self._ex.append(ex)
            self._rows.append(rows)
        self.shard_rows = [len(r) - 1 for r in self._rows]
        self._starts = np.cumsum([0] + self.shard_rows)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _example(self, s: int, e: int) -> Example:
        a, b = int(self._ex[s][e]), int(self._ex[s][e + 1])
        ids = self._tokens[s][a:b].astype(np.int64)
        labels = np.where(self._mask[s][a:b] != 0, ids, IGNORE)
        return Example(ids.tolist(), labels.tolist())

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        r = i - int(self._starts[s])
        examples = [self._example(s, e) for e in range(int(self._rows[s][r]), int(self._rows[s][r + 1]))]
        return examples if self.packing else examples[0]


def remote_copy_dir(url: str, cache_dir: Path) -> Path:
    return cache_dir / "remote" / _sha256_bytes(url.encode())[:16]


def fetch(url: str, local: Path, log=print) -> Path:
    """Copy a prepared dataset at an fsspec URL (s3://, gs://, file://, ...) into `local`, to memory-map.
    Files already there with the right size and checksum are not downloaded again."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        raw = fs.cat_file(f"{root}/{MANIFEST}")
        manifest = json.loads(raw)
        local.mkdir(parents=True, exist_ok=True)
        got = 0
        for split, info in manifest.get("splits", {}).items():
            (local / split).mkdir(exist_ok=True)
            for meta in info["shards"]:
                for ext, k in SHARD_FILES:
                    dst = local / split / f"{meta['name']}{ext}"
                    if _intact(dst, meta, k):
                        continue
                    tmp = dst.with_name(dst.name + ".tmp")
                    fs.get_file(f"{root}/{split}/{dst.name}", str(tmp))
                    tmp.replace(dst)
                    got += 1
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types (auth, network, missing)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"data.prepared '{url}': could not copy the prepared dataset ({type(e).__name__}: {first[:300]}); "
                        "check the URL and your credentials for it") from None
    _write_atomic(local / MANIFEST, raw)
    log(f"data.prepared {url}: {got} file(s) downloaded to {local}")
    return local


def _kill_for_tests(shards_done: int) -> None:
    """Test hook: SIGKILL this process right after writing shard number N (an interrupted prepare)."""
    if os.environ.get("DIST_FT_TEST_KILL_AFTER_SHARD") == str(shards_done):
        os.kill(os.getpid(), signal.SIGKILL)
