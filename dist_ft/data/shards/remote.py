"""Prepared datasets at an fsspec URL (s3://, gs://, file://, ...), copied into the local cache to memory-map.

Credentials never go in the URL (the config refuses that: it is saved in config.yaml, logs and W&B). They come
from the environment: the backend's own variables (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...) or
DIST_FT_STORAGE_OPTIONS, a JSON object handed to fsspec as storage options,
e.g. '{"key": "...", "secret": "..."}'.
"""

from __future__ import annotations

import json
from pathlib import Path

from ... import fsio
from ...errors import UserError
from ...redact import option_values, scrub
from ..sources import STORAGE_OPTIONS, storage_options
from .manifest import MANIFEST, parse_manifest


def remote_copy_dir(url: str, cache_dir: Path) -> Path:
    return cache_dir / "remote" / fsio.sha256_bytes(url.encode())[:16]


def fetch(url: str, local: Path, log=print) -> Path:
    """Copy a prepared dataset at an fsspec URL (s3://, gs://, file://, ...) into `local`, to memory-map.
    The manifest is checked (its file names included) before anything is written; files already there with
    the right size and checksum are not downloaded again."""
    import fsspec

    opts = storage_options()
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
        root = root.rstrip("/")
        raw = fs.cat_file(f"{root}/{MANIFEST}")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise UserError(
                f"data.prepared '{url}': unreadable {MANIFEST} ({e}); re-run dist-ft prepare"
            ) from None
        manifest = parse_manifest(data, f"data.prepared '{url}': {MANIFEST}")
        local.mkdir(parents=True, exist_ok=True)
        got = 0
        for split, info in manifest.splits.items():
            (local / split).mkdir(exist_ok=True)
            for meta in info.shards:
                for name, want in meta.files().items():
                    dst = local / split / name
                    if fsio.mismatch(dst, want) is None:
                        continue
                    tmp = dst.with_name(dst.name + ".tmp")
                    fs.get_file(f"{root}/{split}/{name}", str(tmp))
                    fsio.replace_file(tmp, dst)
                    got += 1
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types (auth, network, missing)
        # signed URLs, tokens, options
        first = scrub((str(e).strip().splitlines() or [type(e).__name__])[0], option_values(opts))
        raise UserError(
            f"data.prepared '{url}': could not copy the prepared dataset ({type(e).__name__}: "
            f"{first[:300]}); check the URL, and the credentials for it in the environment (or "
            f"{STORAGE_OPTIONS})"
        ) from None
    fsio.write_atomic(local / MANIFEST, raw)
    log(f"data.prepared {url}: {got} file(s) downloaded to {local}")
    return local
