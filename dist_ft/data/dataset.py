"""The run's data: token shards (prepared, or built on the fly into a keyed cache), ready to stream per rank.

`build` finds or writes the shards (`shards/`), checks they match this run's tokenizer, template and
sequence settings, and memory-maps them. `Prepared.stream` gives each rank its slice of one global,
deterministic order (`stream.py`); validation rows are few and are held in memory. A mixture (`data.train`
as a list) builds each source's shards on its own and interleaves them by weight (`mixture.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ..config import DataConfig
from ..contracts import Batch
from ..errors import UserError
from ..faults import NONE, Faults
from . import mixture, shards
from .shards import Manifest, ShardSet, SplitStats
from .stream import GlobalOrder, SampleStream

Rows = TypeVar("Rows")


@dataclass
class Split(Generic[Rows]):
    items: Rows  # packed rows (list[Example]) or single Examples; a memory-mapped ShardSet for train
    stats: SplitStats = field(default_factory=SplitStats)


class Collates(Protocol):
    """What the data needs of a task (`dist_ft/tasks`, which this package does not import)."""

    @property
    def collate(self) -> Callable[[Sequence[Any], int, int, bool], Batch]: ...


@dataclass
class Prepared:
    train: Split[ShardSet | mixture.MixedRows]  # (a mixture: MixedRows)
    val: Split[list] | None
    packing: bool
    seq_len: int
    pad_id: int
    root: Path  # the shard directory read
    fingerprint: str  # identity of the train shards' contents
    shuffle_seed: int
    shuffle_window: int
    task: Collates  # the run's task (`dist_ft/tasks`): how rows become a Batch
    # what the task's scan found when the shards were prepared (e.g. labels)
    meta: dict = field(default_factory=dict)
    # sequence parallelism: this rank's shard of each collated batch (`sequence_parallel.shard`)
    shard: Callable[[Batch], Batch] | None = None
    # a mixture: each training source's weight (train.items is a MixedRows), and each validation source's
    # (name, first row, end row) in val.items
    weights: list[float] | None = None
    val_parts: list[tuple[str, int, int]] | None = None

    def collate(self, items: list) -> Batch:
        b = self.task.collate(items, self.seq_len, self.pad_id, self.packing)
        return b if self.shard is None else self.shard(b)

    def stream(self, micro: int, rank: int, world: int) -> SampleStream:
        rows, seed, window = self.train.items, self.shuffle_seed, self.shuffle_window
        order: GlobalOrder | mixture.MixtureOrder
        if isinstance(rows, mixture.MixedRows):
            assert self.weights is not None  # (set with MixedRows)
            orders = [
                GlobalOrder(p.shard_rows, mixture.source_seed(seed, name), window)
                for name, p in zip(rows.names, rows.parts, strict=True)
            ]
            order = mixture.MixtureOrder(orders, self.weights, seed, window)
        else:
            order = GlobalOrder(rows.shard_rows, seed, window)
        return SampleStream(order, micro, rank, world, self.fingerprint)

    def tokens_by_source(self, ids: list[int], items: list) -> dict[str, int]:
        """A mixture's tokens per source in the rows `ids` (read as `items`); {} for one source."""
        rows = self.train.items
        return mixture.tokens_by_source(rows, ids, items) if isinstance(rows, mixture.MixedRows) else {}


def _on_local_main(fn: Callable[[], object], local_rank: int, sync: Callable[[int], int]) -> None:
    """Run `fn` on each node's local rank 0 while the other ranks wait; a failure there fails every rank."""
    err = None
    if local_rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            err = e
    failed = sync(1 if err else 0)
    if err is not None:
        raise err
    if failed:
        raise UserError("data: preparing the shards failed on another rank (its error is printed above)")


def locate(
    cfg: DataConfig,
    tok,
    task,
    local_rank: int = 0,
    sync: Callable[[int], int] = lambda x: x,
    log=print,
    faults: Faults = NONE,
) -> tuple[Path, Manifest]:
    """The shard directory for this config (prepared, fetched or built now) and its checked manifest."""
    if cfg.packing and not task.packable:
        raise UserError(
            f"data.task {task.name} scores one sequence per row (its head pools the last token), so packing "
            "cannot be used; set data.packing: false"
        )
    if cfg.prepared:
        if "://" in cfg.prepared:  # fsspec URL: each node's local rank 0 copies it into the cache
            url = cfg.prepared
            root = shards.remote_copy_dir(url, cfg.cache_path())
            _on_local_main(lambda: shards.fetch(url, root, log), local_rank, sync)
        else:
            root = Path(cfg.prepared).expanduser()
            if not root.is_dir():
                raise UserError(
                    f"data.prepared '{cfg.prepared}': no such directory; write it first with "
                    f"dist-ft prepare CONFIG --out {cfg.prepared}, or fix the path"
                )
        where = f"data.prepared '{cfg.prepared}'"
    else:
        train = cfg.source("train")
        assert train is not None  # the config requires data.train where data.prepared is unset
        root = shards.cache_entry(cfg, tok)

        def build_once() -> None:
            if not (root / shards.MANIFEST).is_file():
                log(f"data: tokenizing {train.path} into {root} (once; later runs of this config reuse it)")
                shards.prepare(cfg, tok, root, task, log=log, progress=None, faults=faults)

        _on_local_main(build_once, local_rank, sync)
        where = str(root)
    manifest = shards.read_manifest(root)
    shards.check_compatible(manifest, where, cfg, tok)
    return root, manifest


def build(
    cfg: DataConfig,
    tok,
    task,
    local_rank: int = 0,
    sync: Callable[[int], int] = lambda x: x,
    log=print,
    faults: Faults = NONE,
    task_for: Callable[[str], Any] | None = None,
) -> Prepared:
    """Find or write the shards (records become examples through `task`), check them, and open them. Every bad
    record or shard raises UserError naming it. A mixture's sources are built each with its own task
    (`task_for(name)`: a source may set `task: pretrain`)."""
    if cfg.mixture or mixture.prepared_mixture(cfg.prepared):
        return _build_mixture(cfg, tok, task, task_for or (lambda _: task), local_rank, sync, log, faults)
    root, manifest = locate(cfg, tok, task, local_rank, sync, log, faults)
    train = shards.ShardSet(root, manifest, "train", cfg.verify_shards, task.group)
    val = None
    if "validation" in manifest.splits:
        vs = shards.ShardSet(root, manifest, "validation", cfg.verify_shards, task.group)
        val = Split([vs[i] for i in range(len(vs))], vs.stats) if len(vs) else None
    return Prepared(
        Split(train, train.stats),
        val,
        cfg.packing,
        cfg.max_seq_len,
        tok.pad_token_id,
        root,
        shards.fingerprint(manifest),
        cfg.seed,
        cfg.shuffle_window,
        task,
        manifest.meta,
    )


def _build_mixture(cfg, tok, task, task_for, local_rank, sync, log, faults) -> Prepared:
    """Each source's shards (in the cache, or the prepared mixture's directory), opened as one stream."""
    plan = mixture.planned(cfg)
    train: list[tuple[str, ShardSet]] = []
    vals: list[tuple[str, ShardSet]] = []
    fps, root = [], Path(cfg.prepared).expanduser() if cfg.prepared else cfg.cache_path()
    for part in plan:
        t = task_for(part.cfg.task)
        path, manifest = locate(part.cfg, tok, t, local_rank, sync, log, faults)
        opened = shards.ShardSet(path, manifest, "train", cfg.verify_shards, t.group)
        if part.role == "train":
            train.append((part.name, opened))
            fps.append(shards.fingerprint(manifest))
            if "validation" in manifest.splits:  # its val_fraction, held out of it
                held = shards.ShardSet(path, manifest, "validation", cfg.verify_shards, t.group)
                vals.append((part.name, held))
        else:
            vals.append((part.name, opened))
    names = [n for n, _ in train]
    weights = [p.weight or 1.0 for p in plan if p.role == "train"]
    rows = mixture.MixedRows(names, [s for _, s in train])
    val_items: list = []
    val_parts = []
    for name, vs in vals:
        if len(vs):
            val_parts.append((name, len(val_items), len(val_items) + len(vs)))
            val_items += [vs[i] for i in range(len(vs))]
    val_stats = SplitStats.total(vs.stats for _, vs in vals)
    return Prepared(
        Split(rows, rows.stats),
        Split(val_items, val_stats) if val_items else None,
        cfg.packing,
        cfg.max_seq_len,
        tok.pad_token_id,
        root,
        mixture.mixture_fingerprint(names, weights, fps),
        cfg.seed,
        cfg.shuffle_window,
        task,
        {},
        weights=weights,
        val_parts=val_parts,
    )


def eval_batches(prep: Prepared, micro: int, rank: int, world: int, items: list | None = None) -> list[Batch]:
    """This rank's validation batches (of `items`: default all validation rows); every rank gets the same
    count (padding batches carry no loss)."""
    assert prep.val is not None  # called only for a run with validation rows
    items = prep.val.items if items is None else items
    mine = items[rank::world]
    per_rank = -(-len(items) // world)  # ceil: the most rows any rank holds
    n_batches = -(-per_rank // micro)
    out = []
    for b in range(n_batches):
        chunk = mine[b * micro : (b + 1) * micro]
        if chunk:
            out.append(prep.collate(chunk))
        else:  # keep collectives (ZeRO-3 gathers) in step across ranks
            out.append(prep.collate(items[:1]).without_loss())
    return out
