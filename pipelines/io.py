"""What the stages read and write: JSON, Parquet, shards, scores, output folders and the manifest.

Every path is a local path or an fsspec url (s3://...). Every file the stages write themselves
(img2dataset writes the shards) goes through atomic_open (train/files.py): it appears whole or
not at all, so a killed run never leaves a half file under a final name. The dataset root's manifest.json records what produced what (stage, config
digest, versions, outputs, counts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib import metadata
from typing import Iterator

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from polars.io.plugins import register_io_source

from pipelines.config import Config, ConfigError, dump_config, is_local, join
from train.files import TMP, atomic_open, atomic_write  # noqa: F401  (the stages write through these)

SCORE_COLUMNS = ["key", "row", "status", "error", "cosine", "dn_score", "loss", "clean_prob",
                 "image_nn_keys", "image_nn_sims", "text_nn_keys", "text_nn_sims"]  # a scores file less its embeddings
PACKAGES = ("softcurate", "img2dataset", "webdataset", "dask", "distributed", "polars", "pyarrow", "pillow",
            "torch", "open_clip_torch")


# ---------------------------------------------------------------- files
def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def read_json(path: str, default=None):
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return default
    with fs.open(p, "r") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_parquet(path: str, columns: list[str] | None = None) -> pl.DataFrame:
    with fsspec.open(path, "rb") as f:
        return pl.read_parquet(f, columns=columns)


def scan_parquet(path: str, columns: list[str]) -> pl.LazyFrame:
    """`columns` of a parquet file, lazily: polars scans local files itself (reading only what a query
    needs); other filesystems go through fsspec, the file's `columns` read whole."""
    if is_local(path):
        return pl.scan_parquet(fsspec.core.url_to_fs(path)[1]).select(columns)
    return read_parquet(path, columns).lazy()


def write_parquet(path: str, df: pl.DataFrame) -> None:
    with atomic_open(path) as f:
        df.write_parquet(f)


def sink_parquet(path: str, schema: dict, frames: Iterator[pl.DataFrame]) -> None:
    """Frames one after another as one parquet file, by polars' writer, a frame at a time. The bytes are
    `write_parquet`'s of their concatenation while that is one row group (the tests' and the demo's
    sizes); beyond, the rows are the same and the row groups may be cut elsewhere."""
    source = register_io_source(lambda *_: frames, schema=schema)  # asked once, for one pass
    with atomic_open(path) as f:
        source.sink_parquet(f, engine="streaming")


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A pyarrow Table, read without a thread pool (score tasks run in Dask workers)."""
    with fsspec.open(path, "rb") as f:
        return pq.read_table(f, columns=columns, use_threads=False)


def write_table(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f, compression="zstd")


# ---------------------------------------------------------------- shards and scores
def read_shard(url: str) -> list[dict]:
    """A shard's samples sorted by key (as the shard stage writes them; a shard made elsewhere may not be)."""
    import webdataset as wds  # here, not at the top: it imports torch (seconds, ~500 MB)

    import train.data  # noqa: F401  (registers fsspec with webdataset: s3:// shards open too)

    samples = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.warn_and_continue)))
    return sorted(samples, key=lambda s: s["__key__"])


def finished_shards(config: Config) -> list[str]:
    """The urls of the shard stage's complete shards, from its summary; a clear error when there are none."""
    done = read_json(join(config.shard_dir(), "_summary.json"))
    if not done or not done["shards"]:
        raise ConfigError(f"{config.shard_dir()} holds no complete shards; run the shard stage first")
    return [join(config.shard_dir(), name) for name in done["shards"]]


def score_files(config: Config) -> tuple[dict[str, str], list[str], list[str]]:
    """The scores file of every complete shard that has one, by shard name in shard order, the
    shards' names, and the names of those whose scores are missing."""
    names = [os.path.basename(url).removesuffix(".tar") for url in finished_shards(config)]
    paths = {name: join(config.score_dir(), name + ".parquet") for name in names}
    missing = [name for name in names if not exists(paths[name])]
    if len(missing) == len(names):
        raise ConfigError(f"no scores in {config.score_dir()} for the {len(names)} shards; run the score stage first")
    return {name: path for name, path in paths.items() if name not in missing}, names, missing


def scan_scores(config: Config, columns: list[str] = SCORE_COLUMNS) -> tuple[pl.LazyFrame, list[str], list[str]]:
    """A lazy scan of every complete shard's scores (`columns`, and the shard's name as `shard`), in shard
    order, the shards' names, and the names of those whose scores are missing. Collect only the
    columns a step needs, with `engine="streaming"`."""
    paths, names, missing = score_files(config)
    frames = [scan_parquet(path, columns).with_columns(shard=pl.lit(name)) for name, path in paths.items()]
    return pl.concat(frames), names, missing


def score_facts(config: Config, paths: list[str], steps: list[dict]) -> tuple[list, dict]:
    """The scores files as the policy's parts, and the steps' global facts over them (curate.policies)."""
    from curate.policies import NumericKeys, global_facts

    parts = [functools.partial(scan_parquet, path) for path in paths]
    try:
        return parts, global_facts(parts, steps, NumericKeys())
    except ValueError as err:  # keys that are not img2dataset's
        raise ConfigError(f"{config.score_dir()}: {err}") from None


def read_scores(config: Config, columns: list[str] = SCORE_COLUMNS) -> tuple[pl.DataFrame, list[str], list[str]]:
    """`scan_scores`, collected."""
    frame, names, missing = scan_scores(config, columns)
    return frame.collect(engine="streaming"), names, missing


# ---------------------------------------------------------------- ground truth
TRUTH_KEYS = ("key", "url", "row")  # what a labels table may name its pairs by, in this order of preference


def read_truth(path: str | None, columns: tuple[str, ...] = ("noise_type",)) -> pl.DataFrame | None:
    """A labels table (Parquet, or CSV with a header): a pair's key, url or row (its line in the url list)
    and `noisy`, first, then any of `columns` it has. None without a path; a missing file is said and
    skipped (detection quality is information, not a reason to stop)."""
    if path is None:
        return None
    if not exists(path):
        print(f"truth: no labels table at {path}; detection quality is not reported")
        return None
    with fsspec.open(path, "rb") as f:
        table = pl.read_csv(f, infer_schema=False) if path.endswith(".csv") else pl.read_parquet(f)
    on = next((c for c in TRUTH_KEYS if c in table.columns), None)
    if on is None or "noisy" not in table.columns:
        raise ConfigError(f"truth {path}: needs a column noisy and one of {', '.join(TRUTH_KEYS)}; it has {table.columns}")
    noisy = pl.col("noisy")
    noisy = noisy.str.to_lowercase().is_in(["true", "1", "yes"]) if table["noisy"].dtype == pl.String else noisy.cast(pl.Boolean)
    table = table.select(pl.col(on).cast(pl.Int64 if on == "row" else pl.String), noisy,
                         *[c for c in columns if c in table.columns and c not in (on, "noisy")])
    if table[on].is_duplicated().any():
        raise ConfigError(f"truth {path}: {table[on].is_duplicated().sum()} rows repeat a {on}; each pair needs one label")
    return table


def with_truth(config: Config, table: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """`table` (key, row) with the labels of its pairs (null where the labels table has none); a table
    by url is matched through the shards' parquet files."""
    on = truth.columns[0]
    if on not in table.columns:
        urls = pl.concat([read_parquet(url.removesuffix(".tar") + ".parquet", ["key", "url"]) for url in finished_shards(config)])
        table = table.join(urls, on="key", how="left")
    return table.join(truth, on=on, how="left")


# ---------------------------------------------------------------- output folders
def prepare_output(out: str, section: str, overwrite: bool = False, identity: dict | None = None,
                   state: str = "_state.json") -> None:
    """Claim the folder `out` for a run of the stage `section`.

    overwrite empties it first. With an identity (what the folder's bytes depend on), a folder
    holding the output of another identity is refused, since resuming onto it would mix the two;
    the identity is then written to `state`. An earlier run's _summary.json, which marks a
    finished run, is removed: this run writes its own when it finishes.
    """
    fs, path = fsspec.core.url_to_fs(out)
    if overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
    if identity is not None:
        previous = read_json(join(out, state))
        changed = [key for key in identity if previous.get(key) != identity[key]] if previous else []
        if changed:
            raise ConfigError(f"{out} holds the output of another {' and '.join(changed)} (see its {state}); set "
                              f"{section}.overwrite=true to discard it, or choose another {section}.output")
    fs.makedirs(path, exist_ok=True)
    if fs.exists(join(path, "_summary.json")):
        fs.rm(join(path, "_summary.json"))
    if identity is not None:
        write_json(join(out, state), identity)


# ---------------------------------------------------------------- the manifest
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
