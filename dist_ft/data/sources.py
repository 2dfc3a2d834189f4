"""Read records from local JSONL / JSON / Parquet files, directories, or Hugging Face datasets.

Each record comes with a location string ("file.jsonl:17", "name[train]#42") used in error messages.
Files must be UTF-8. One JSONL record (line) may be at most `max_record_bytes()` bytes: 32 MiB, or
$DIST_FT_MAX_RECORD_BYTES; a longer line is refused after reading that much of it, never whole.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import SourceConfig
from ..errors import UserError
from ..redact import option_values, scrub
from .formats import json_type

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
STORAGE_OPTIONS = (
    "DIST_FT_STORAGE_OPTIONS"  # credentials for fsspec URLs: never in the config (it is saved and logged)
)
# per JSONL line: ~8M tokens; longer documents should be split into several records
MAX_RECORD_BYTES = 32 << 20


def storage_options(environ=os.environ) -> dict:
    """fsspec storage options from $DIST_FT_STORAGE_OPTIONS ({} when unset). Its value is never echoed: it
    holds secrets."""
    raw = environ.get(STORAGE_OPTIONS, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise UserError(
            f"{STORAGE_OPTIONS}: not valid JSON ({getattr(e, 'msg', 'parse error')} at column "
            f"{getattr(e, 'colno', '?')}); "
            'set it to a JSON object of fsspec storage options, e.g. \'{"key": "...", "secret": "..."}\''
        ) from None
    if not isinstance(opts, dict):
        raise UserError(
            f"{STORAGE_OPTIONS}: must be a JSON object of fsspec storage options (got a JSON "
            f"{json_type(opts)}), "
            'e.g. \'{"key": "...", "secret": "..."}\''
        )
    return opts


def max_record_bytes() -> int:
    raw = os.environ.get("DIST_FT_MAX_RECORD_BYTES", "").strip()
    if not raw:
        return MAX_RECORD_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(
            f"DIST_FT_MAX_RECORD_BYTES={raw!r}: expected a positive number of bytes, e.g. 67108864 (64 MiB)"
        )
    return int(raw)


def _decode(raw: bytes, where: str, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the "
            f"file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
        ) from None


def _object(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise UserError(
            f'{where}: expected a JSON object (a record such as {{"messages": [...]}}), got a JSON '
            f"{json_type(rec)}; put one object per record"
        )
    return rec


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    limit = max_record_bytes()
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(limit + 1)  # never more than the limit in memory, however long the line
            if not raw:
                return
            if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                raise UserError(
                    f"{path}:{lineno}: record is longer than {limit:,} bytes ({limit / (1 << 20):g} MiB, the "
                    "limit per record); split the document into several records, or raise "
                    "$DIST_FT_MAX_RECORD_BYTES"
                )
            line = _decode(
                raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, f"{path}:{lineno}", path
            )
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line"
                ) from None
            yield f"{path}:{lineno}", _object(rec, f"{path}:{lineno}")


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        _decode(raw[raw.rfind(b"\n", 0, e.start) + 1 :].split(b"\n", 1)[0], f"{path}:{line}", path)
        raise  # pragma: no cover - _decode raised on that line
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix
            yield from _jsonl(path)
            return
        raise UserError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file"
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON array of objects (records), got a JSON {json_type(data)}; write "
            "[{...}, {...}], or one object per line in a .jsonl file"
        )
    for i, rec in enumerate(data):
        yield f"{path}[{i}]", _object(rec, f"{path}[{i}]")


def _hf(
    name: str, split: str, subset: str | None, streaming: bool = False, file: Path | None = None, **kw
) -> Iterator[tuple[str, dict]]:
    """Records of a hub dataset or local dataset directory, or of `file` (read by the `name` builder, e.g.
    parquet)."""
    import datasets

    opts = storage_options() if "://" in name else {}
    try:
        ds = datasets.load_dataset(
            name,
            subset,
            split=split,
            streaming=streaming,
            **kw,
            **({"storage_options": opts} if opts else {}),
        )
    except (
        Exception
    ) as e:  # datasets raises many types (FileNotFound, ConnectionError, ValueError, ArrowInvalid...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # a hub or fsspec error may quote a signed URL, a token, the storage options
        first = scrub(first, option_values(opts))
        if file is not None:
            raise UserError(
                f"{file}: not a readable {name} file ({first.rstrip('.')}); re-export it, or convert it to "
                ".jsonl"
            ) from None
        raise UserError(
            scrub(
                f"data source '{name}' (split '{split}'): could not load: {first}. "
                "Use a local .jsonl/.json/.parquet path, or a dataset name reachable from this machine"
            )
        ) from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]#{i}", dict(rec)


def iter_records(src: SourceConfig) -> Iterator[tuple[str, dict]]:
    """Records of one source, one at a time, each as (location, record); never holds the source in memory
    (hub datasets with `streaming: true` are not even downloaded whole). Raises UserError on missing/malformed
    input."""
    path = Path(src.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl(path)
        elif suffix == ".json":
            yield from _json(path)
        elif suffix == ".parquet":
            for i, (_, r) in enumerate(
                _hf("parquet", "train", None, src.streaming, path, data_files=str(path))
            ):
                yield f"{path}#{i}", r
        else:
            raise UserError(
                f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}"
            )
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
        raise UserError(
            f"{src.path}: no records (the file is empty); add data or point the config at another file"
        )
    return records
