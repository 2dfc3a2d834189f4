"""Read records from local JSONL / JSON / Parquet files, directories, or Hugging Face datasets.

Each record comes with a location string ("file.jsonl:17", "name[train]#42") used in error messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..config import SourceConfig
from ..errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            yield f"{path}:{lineno}", rec


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix
            yield from _jsonl(path)
            return
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: element {i}: expected an object, got {type(rec).__name__}")
        yield f"{path}[{i}]", rec


def _hf(name: str, split: str, subset: str | None, streaming: bool = False, **kw) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming, **kw)
    except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data source '{name}' (split '{split}'): could not load: {first}. "
                        "Use a local .jsonl/.json/.parquet path, or a dataset name reachable from this machine") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]#{i}", dict(rec)


def iter_records(src: SourceConfig) -> Iterator[tuple[str, dict]]:
    """Records of one source, one at a time, each as (location, record); never holds the source in memory
    (hub datasets with `streaming: true` are not even downloaded whole). Raises UserError on missing/malformed input."""
    path = Path(src.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl(path)
        elif suffix == ".json":
            yield from _json(path)
        elif suffix == ".parquet":
            for i, (_, r) in enumerate(_hf("parquet", "train", None, src.streaming, data_files=str(path))):
                yield f"{path}#{i}", r
        else:
            raise UserError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
    elif path.is_dir():
        yield from _hf(str(path), src.split, src.subset, src.streaming)
    elif path.suffix.lower() in FILE_SUFFIXES or src.path.startswith((".", "/", "~")):
        raise UserError(f"{src.path}: no such file; check data.train.path / data.validation.path")
    else:
        yield from _hf(src.path, src.split, src.subset, src.streaming)


def read_records(src: SourceConfig) -> list[tuple[str, dict]]:
    """All records of one source as a list (small sources: evaluation sets). Raises UserError when empty."""
    records = list(iter_records(src))
    if not records:
        raise UserError(f"{src.path}: no records (the file is empty); add data or point the config at another file")
    return records
