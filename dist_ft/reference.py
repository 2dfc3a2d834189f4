"""Reference log-probs for tasks that compare the policy with its starting point (`Task.reference`: DPO).

Computed once, before the first step, by the engine still holding the starting weights (every rank scores a
slice; under ZeRO-3 each forward gathers as in training), then stored beside the shards as
`reference/<key>.npz`, keyed by the starting weights' sha256, the precision and the data: a resumed or
requeued run reads it back instead of scoring again, a changed model or precision gets a new file, and a
checkpoint refuses to continue on other starting weights (its manifest holds their hash). No second model is
in memory.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import dist, fsio, sequence_parallel
from .adapters import fingerprint
from .data.dataset import Prepared
from .data.shards import ShardSet
from .engine import whole_params
from .loss import batch_sequence_logps


def starting_point(cfg, task, prep: Prepared, engine, precision: str, env) -> tuple[Prepared, str]:
    """`prep` with the reference log-probs its task needs (itself where none), and the sha256 a checkpoint of
    this run must continue from ("" where any may): an adapter's frozen base, or the starting weights a task's
    reference is. Call before a checkpoint loads: the engine must still hold the starting weights."""
    if cfg.model.peft is not None:
        return prep, fingerprint(whole_params(engine.module))
    if not task.reference:
        return prep, ""
    sha = fingerprint(whole_params(engine.module, frozen_only=False))
    with_refs = attach(
        prep,
        engine,
        key(sha, precision, prep),
        cfg.data.cache_path(),
        cfg.train.micro_batch_size,
        env,
        print if env.is_main else lambda *_: None,
    )
    return with_refs, sha


def key(weights_sha256: str, precision: str, prep: Prepared) -> str:
    parts = {
        "weights": weights_sha256,
        "precision": precision,
        "data": prep.fingerprint,
        "validation": len(prep.val.items) if prep.val else 0,
    }
    return fsio.sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def _paths(prep: Prepared, cache: Path, k: str) -> list[Path]:
    """Beside the shards, or (where that directory cannot be written) in the cache."""
    return [prep.root / "reference" / f"{k[:16]}.npz", cache / "reference" / f"{k[:16]}.npz"]


def _rows(prep: Prepared) -> ShardSet:
    rows = prep.train.items
    assert isinstance(rows, ShardSet)  # (a mixture is sft / pretrain only: the config refuses it here)
    return rows


def _sizes(prep: Prepared) -> dict[str, int]:
    sizes = {"train": _rows(prep).n_examples}
    if prep.val:
        sizes["validation"] = sum(len(row) for row in prep.val.items)
    return sizes


def _read(paths: list[Path], k: str, sizes: dict[str, int]) -> dict | None:
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                got = {s: z[s].astype(np.float64) for s in sizes}
                if str(z["key"]) == k and all(len(got[s]) == n for s, n in sizes.items()):
                    return got
        except (OSError, KeyError, ValueError):
            continue
    return None


def _write(paths: list[Path], k: str, refs: dict) -> Path:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(k), **refs)
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fsio.write_atomic(p, buf.getvalue())
            return p
        except OSError:
            continue
    raise OSError(f"cannot write reference log-probs to {' or '.join(str(p.parent) for p in paths)}")


def _score(engine, prep: Prepared, rows, ids_of, n_rows: int, n_ex: int, micro: int, env) -> torch.Tensor:
    """Summed completion log-prob of every example of `rows`, [n_ex] fp64, each reader scoring rows
    reader::readers (and running as many forwards as every other rank, so ZeRO-3's gathers stay in step).
    Sequence parallelism: a group's ranks score the same rows, each its shard (`prep.collate`); the sums
    over the group are the same on each, so its first rank alone keeps them."""
    sp = getattr(engine, "sequence_parallel", 1)
    rank, world = sequence_parallel.readers(env.rank, env.world_size, sp)
    keeps = env.rank % sp == 0
    out = torch.zeros(n_ex, dtype=torch.float64, device=engine.device)
    mine = list(range(rank, n_rows, world))
    with torch.no_grad():
        per_rank = -(-n_rows // world)  # ceiling divisions
        for b in range(-(-per_rank // micro)):
            idx = mine[b * micro : (b + 1) * micro]
            batch = prep.collate([rows(i) for i in idx]) if idx else prep.collate([rows(0)]).without_loss()
            lp = batch_sequence_logps(engine, batch)
            if idx and keeps:
                out[torch.tensor([e for i in idx for e in ids_of(i)], device=engine.device)] = lp
    return dist.all_sum_tensor(out)


def attach(prep: Prepared, engine, k: str, cache: Path, micro: int, env, log) -> Prepared:
    """`prep` whose every example carries its reference log-prob (`Example.ref`): read back by rank 0 when
    stored under key `k`, else scored now by all ranks and stored by rank 0. `prep` itself is left as it
    was."""
    paths, sizes = _paths(prep, cache, k), _sizes(prep)
    refs = dist.broadcast_object(_read(paths, k, sizes) if env.is_main else None)
    if refs is None:
        t0, n = time.perf_counter(), sum(sizes.values())
        log(
            f"reference: scoring {n:,} sequences with the starting model "
            f"(once; stored under its weights' hash {k[:12]})"
        )
        engine.eval()
        train = _rows(prep)
        refs = {
            "train": _score(
                engine,
                prep,
                train.__getitem__,
                train.example_ids,
                len(train),
                sizes["train"],
                micro,
                env,
            )
        }
        if prep.val:
            starts = np.cumsum([0] + [len(r) for r in prep.val.items])
            refs["validation"] = _score(
                engine,
                prep,
                prep.val.items.__getitem__,
                lambda i: range(starts[i], starts[i + 1]),
                len(prep.val.items),
                sizes["validation"],
                micro,
                env,
            )
        engine.train()
        refs = {s: v.cpu().numpy() for s, v in refs.items()}
        if env.is_main:
            where = _write(paths, k, refs)
            log(f"reference: {n:,} sequences scored in {time.perf_counter() - t0:.1f} s; stored in {where}")
        dist.wait_for_all("rank 0 stores the reference log-probs")
    else:
        log(f"reference: log-probs of the starting model read back ({k[:12]})")
    val = None
    if prep.val:
        flat = iter(refs["validation"])
        val = replace(
            prep.val, items=[[replace(ex, ref=float(next(flat))) for ex in row] for row in prep.val.items]
        )
    return replace(prep, train=replace(prep.train, items=_rows(prep).with_refs(refs["train"])), val=val)
