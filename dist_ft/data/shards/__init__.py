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

Modules: `manifest` (the typed contents of manifest.json and shard-N.json), `identity` (what shards
depend on, the cache key, compatibility with a run), `pool` (a split's records turned into examples
by the task, in order, in workers), `write` (the writer and `prepare`), `read` (`ShardSet`),
`remote` (copying a prepared dataset from an fsspec URL).
"""

from .identity import (
    SETTINGS,
    cache_entry,
    check_compatible,
    dataset_key,
    tokenizer_identity,
)
from .manifest import (
    COUNTERS,
    FORMAT,
    MANIFEST,
    SHARD_FILES,
    VERSION,
    Manifest,
    ShardMeta,
    SplitManifest,
    SplitStats,
    fingerprint,
    read_manifest,
)
from .read import ShardSet
from .remote import fetch, remote_copy_dir
from .write import prepare

__all__ = [
    "COUNTERS",
    "FORMAT",
    "MANIFEST",
    "SETTINGS",
    "SHARD_FILES",
    "VERSION",
    "Manifest",
    "ShardMeta",
    "ShardSet",
    "SplitManifest",
    "SplitStats",
    "cache_entry",
    "check_compatible",
    "dataset_key",
    "fetch",
    "fingerprint",
    "prepare",
    "read_manifest",
    "remote_copy_dir",
    "tokenizer_identity",
]
