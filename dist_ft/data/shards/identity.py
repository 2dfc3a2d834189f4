"""What shards depend on: the tokenizer, the sources and the settings. Their hash (`dataset_key`) names the
on-the-fly cache entry, and `check_compatible` refuses shards made for another tokenizer, template or
length."""

from __future__ import annotations

import json
from pathlib import Path

from ...config import DataConfig, SourceConfig
from ...errors import UserError
from ...fsio import sha256_bytes
from ..chat import template_text
from .manifest import VERSION, Manifest

SETTINGS = ("max_seq_len", "packing", "task", "format", "overlong", "shard_tokens")


def tokenizer_identity(tok) -> dict:
    """Name, content hash (vocabulary, merges, added/special tokens) and chat-template hash of a tokenizer."""
    body = tok.backend_tokenizer.to_str() + json.dumps(tok.special_tokens_map, sort_keys=True, default=str)
    return {
        "name": tok.name_or_path,
        "sha256": sha256_bytes(body.encode()),
        "vocab_size": len(tok),
        "template_sha256": sha256_bytes(template_text(tok).encode()),
    }


def source_identity(src: SourceConfig | list[SourceConfig] | None) -> dict | list | None:
    """What a source is: for local files their size and mtime (a changed file gets new shards). How a
    mixture uses a source (weight, name; its format and task are settings) is not part of it."""
    if src is None:
        return None
    if isinstance(src, list):
        return [source_identity(s) for s in src]
    ident = src.model_dump(exclude=set(SourceConfig.MIXING))
    path = Path(src.path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        ident["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return ident


def dataset_key(cfg: DataConfig, tok) -> dict:
    """Everything the shard contents depend on; its hash names the on-the-fly cache entry."""
    key = {
        "format_version": VERSION,
        "tokenizer": tokenizer_identity(tok),
        **{k: getattr(cfg, k) for k in SETTINGS},
        # (only where it is not the default, so the shards of every config before it keep their key)
        **({"train_on": cfg.train_on} if cfg.train_on != "all_assistant" else {}),
        "train": source_identity(cfg.train),
        "validation": source_identity(cfg.validation),
        "val_fraction": cfg.val_fraction if cfg.validation is None else 0.0,
        "split_seed": cfg.seed,
    }
    key["sha256"] = sha256_bytes(json.dumps(key, sort_keys=True).encode())
    return key


def cache_entry(cfg: DataConfig, tok) -> Path:
    """Where `train` builds (and `dist-ft prepare` without --out writes) the shards of this config."""
    return cfg.cache_path() / "shards" / dataset_key(cfg, tok)["sha256"][:16]


def check_compatible(manifest: Manifest, where: str, cfg: DataConfig, tok) -> None:
    """Shards must come from this run's tokenizer, template and sequence settings: say which one differs."""
    mine = tokenizer_identity(tok)
    theirs = manifest.key["tokenizer"]
    if theirs["sha256"] != mine["sha256"]:
        raise UserError(
            f"{where}: shards were tokenized with another tokenizer ('{theirs['name']}', hash "
            f"{theirs['sha256'][:12]}) than this run's ('{mine['name']}', hash {mine['sha256'][:12]}); "
            "re-run dist-ft prepare with this model.path"
        )
    if theirs["template_sha256"] != mine["template_sha256"]:
        raise UserError(
            f"{where}: shards were rendered with another chat template (hash "
            f"{theirs['template_sha256'][:12]}, this run {mine['template_sha256'][:12]}); re-run dist-ft "
            "prepare with this model.chat_template"
        )
    for k in ("max_seq_len", "packing", "task", "train_on"):
        theirs_k = manifest.key.get(k, "all_assistant" if k == "train_on" else None)
        if theirs_k != getattr(cfg, k):
            raise UserError(
                f"{where}: shards were prepared with data.{k}={theirs_k!r}, this run has "
                f"data.{k}={getattr(cfg, k)!r}; set data.{k}={theirs_k!r} or re-run dist-ft prepare"
            )
