"""Prepared datasets at an fsspec URL (s3://, gs://, file://, ...), copied into the local cache to memory-map."""

from __future__ import annotations

import json
from pathlib import Path

from ... import fsio
from ...errors import UserError
from .manifest import MANIFEST, ShardMeta


def remote_copy_dir(url: str, cache_dir: Path) -> Path:
    return cache_dir / "remote" / fsio.sha256_bytes(url.encode())[:16]


def fetch(url: str, local: Path, log=print) -> Path:
    """Copy a prepared dataset at an fsspec URL (s3://, gs://, file://, ...) into `local`, to memory-map.
    Files already there with the right size and checksum are not downloaded again."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        raw = fs.cat_file(f"{root}/{MANIFEST}")
        manifest = json.loads(raw)  # read loosely here: read_manifest checks format and version once it is local
        local.mkdir(parents=True, exist_ok=True)
        got = 0
        for split, info in manifest.get("splits", {}).items():
            (local / split).mkdir(exist_ok=True)
            for meta in info["shards"]:
                for name, want in ShardMeta.from_json(meta).files().items():
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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"data.prepared '{url}': could not copy the prepared dataset ({type(e).__name__}: {first[:300]}); "
                        "check the URL and your credentials for it") from None
    fsio.write_atomic(local / MANIFEST, raw)
    log(f"data.prepared {url}: {got} file(s) downloaded to {local}")
    return local
