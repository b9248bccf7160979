"""The dataset root's manifest.json: what produced what (stage, config digest, versions, shards, counts).

Writes go through a temporary name and a rename, so a killed run never leaves a half file.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata

import fsspec

from pipelines.config import Config, dump_config, join

PACKAGES = ("softcurate", "img2dataset", "webdataset", "dask", "distributed", "polars", "pyarrow", "pillow",
            "torch", "open_clip_torch")


def atomic_write(path: str, data: str | bytes) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    tmp = p + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    fs.mv(tmp, p)


def write_parquet(df, path: str) -> None:
    """A polars DataFrame to Parquet, under a temporary name first."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p + ".tmp", "wb") as f:
        df.write_parquet(f)
    fs.mv(p + ".tmp", p)


def read_json(path: str, default=None):
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return default
    with fs.open(p, "r") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def config_digest(config: Config) -> str:
    return hashlib.sha256(dump_config(config).encode()).hexdigest()[:16]


def record_stage(config: Config, stage: str, entry: dict) -> dict:
    """Merge one stage's record into <root>/manifest.json and return the whole manifest."""
    path = join(config.root, "manifest.json")
    manifest = read_json(path, {"stages": {}})
    manifest["stages"][stage] = {"config_digest": config_digest(config), "versions": versions(), **entry}
    write_json(path, manifest)
    return manifest
