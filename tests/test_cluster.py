"""Every data stage on an existing Dask cluster: a real `dask scheduler` and two `dask worker` processes
on loopback, joined with `--scheduler`, give what the LocalCluster runs of the session fixture gave.

The workers start outside the repository, so what they import is the installed softcurate (a
cluster's workers need the package installed, as any Dask code's workers do).
"""

import atexit
import hashlib
import json
import logging
import tarfile
import time

import polars as pl
import pytest
from conftest import SCORED_FAILING, SCORED_PER_SHARD, N, config_for, dask_cluster, demo_shard_overrides, run_shard

from pipelines.config import load_config
from pipelines.curate import run_curate
from pipelines.distributor import dask_client
from pipelines.score import run_score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(2, cwd=tmp_path_factory.mktemp("workers")) as (address, _):
        yield address


def digests(folder, pattern="*.parquet"):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def tree_digests(folder) -> dict[str, str]:
    """Every file under a folder but the summary (which names the folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "_summary.json"}


def samples_by_key(shard_dir) -> dict[str, tuple]:
    """Every sample of the shards by key: (row, caption, image digest); a key seen twice fails the test."""
    found: dict[str, tuple] = {}
    for path in sorted(shard_dir.glob("0*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(files):
            key, ext = name.rsplit(".", 1)
            if ext != "json":
                continue
            assert key not in found, f"sample {key} is in the shards twice"
            found[key] = (json.loads(files[name])["row"], files[key + ".txt"].decode(),
                          hashlib.sha256(files[key + ".jpg"]).hexdigest())
    return found


def rows_by_key(shard_dir) -> pl.DataFrame:
    """The shards' parquet rows (failures included) in key order, without per-run fields."""
    return pl.read_parquet(shard_dir / "0*.parquet", columns=["key", "row", "status", "caption"]).sort("key")


def shard_config(root, world_dir, *overrides):
    """The session fixture's shard settings, into another root: the same world, the same samples."""
    return load_config(None, [f"root={root}", *demo_shard_overrides(world_dir, N, SCORED_PER_SHARD, 100, SCORED_FAILING),
                              *overrides])


def test_shard_on_an_existing_cluster_matches_the_local_cluster(scored, cluster, tmp_path):
    root, _ = scored
    summary = run_shard(shard_config(tmp_path / "root", root / "world", f"shard.scheduler={cluster}"))
    local = json.loads((root / "shards" / "_summary.json").read_text())
    assert summary["counts"] == local["counts"] and summary["shards"] == local["shards"]
    assert not summary["incomplete_shards"]
    # Each sample's json carries its url, whose port is the serving run's, so compare samples by key:
    # the same key holds the same row, caption and image.
    assert samples_by_key(tmp_path / "root" / "shards") == samples_by_key(root / "shards")
    assert rows_by_key(tmp_path / "root" / "shards").equals(rows_by_key(root / "shards"))


def test_score_and_curate_on_an_existing_cluster_give_the_same_bytes(scored, cluster, tmp_path):
    root, _ = scored
    remote = run_score(config_for(root, f"score.output={tmp_path / 'scores'}", f"score.scheduler={cluster}"))
    assert remote["counts"]["samples"] == N
    assert digests(tmp_path / "scores") == digests(root / "scores")
    assert digests(tmp_path / "scores" / "_embed") == digests(root / "scores" / "_embed")
    # curate is a driver-side polars job (no Dask, see DECISIONS.md): the same scores give the same keep-list and export
    run_curate(config_for(root, f"curate.output={tmp_path / 'local'}"), export=True)
    run_curate(config_for(root, f"score.output={tmp_path / 'scores'}", f"curate.output={tmp_path / 'remote'}"), export=True)
    assert tree_digests(tmp_path / "remote") == tree_digests(tmp_path / "local")


def test_local_cluster_waits_for_its_workers_to_exit():
    """A worker slow to exit (6 s of teardown, as one that imported torch on a busy machine) is waited for,
    not killed with a warning at the end of every stage."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("distributed.nanny").addHandler(handler)
    try:
        with dask_client(None, 1) as client:
            client.submit(atexit.register, time.sleep, 6, pure=False).result()
            started = time.time()
    finally:
        logging.getLogger("distributed.nanny").removeHandler(handler)
    assert time.time() - started >= 6  # the worker ran its exit handler to the end
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
