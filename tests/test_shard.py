"""The shard stage with the real parts: the loopback world server, img2dataset, Dask clusters, webdataset."""

import json
import shutil
import subprocess
import tarfile
import time

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import BIN, free_port, run_shard
from dask.distributed import Client

from pipelines.config import ConfigError, ShardConfig, load_config
from pipelines.shard import CanonicalShards, failure_reason
from pipelines.world import build_world
from pipelines.world_server import serve_world

N_TRAIN = 240
FAILING = {"http_404": 2, "http_500": 2, "timeout": 1, "truncated": 2, "html": 2}
EXPECTED_FAILURES = {"http 404": 2, "http 500": 2, "timeout": 1, "truncated download": 2, "not an image": 2}


def demo_config(root, world_dir, **shard):
    overrides = [f"root={root}", "stages=[world, shard]", f"world.dir={world_dir}", f"world.n_train={N_TRAIN}",
                 "world.n_val=4", "world.n_test=4", "world.timeout_delay=20", f"world.failing_urls={json.dumps(FAILING)}",
                 "shard.processes=2", "shard.threads=16", "shard.samples_per_shard=100", "shard.image_size=64",
                 "shard.timeout=2", "shard.allow_private_urls=true"]
    overrides += [f"shard.{k}={v}" for k, v in shard.items()]
    return load_config(None, overrides)


def read_samples(shard_dir):
    samples = []
    for tar in sorted(shard_dir.glob("0*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode("pil"):
            samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    base = tmp_path_factory.mktemp("shard")
    config = demo_config(base / "root", base / "world")
    build_world(config.world, config.world_dir(), config.seed)
    summary = run_shard(config)
    return config, summary, base


@pytest.mark.slow
def test_demo_world_to_webdataset_end_to_end(sharded):
    config, summary, base = sharded
    counts = summary["counts"]
    assert counts["input_rows"] == N_TRAIN + sum(FAILING.values())
    assert counts["successes"] == N_TRAIN
    assert counts["successes"] + counts["failures"] == counts["input_rows"]
    reasons = {r["reason"]: r["count"] for r in summary["failures_by_reason"]}
    assert reasons == EXPECTED_FAILURES

    shard_dir = base / "root" / "shards"
    assert summary["shards"] == ["00000.tar", "00001.tar", "00002.tar"] and not summary["incomplete_shards"]
    truth = pl.read_parquet(base / "world" / "truth.parquet").select("row", "caption")
    samples = read_samples(shard_dir)
    assert len(samples) == N_TRAIN
    by_row = dict(truth.iter_rows())
    for sample in samples:
        meta = sample["json"]
        assert sample["txt"] == by_row[meta["row"]] == meta["caption"]
        assert sample["jpg"].size == (64, 64)
        assert meta["key"] == sample["__key__"] and meta["status"] == "success"
    assert sorted(s["json"]["row"] for s in samples) == list(range(N_TRAIN))

    # Parquet is the interface: polars and DuckDB read every row, failures included, with their reason.
    rows = pl.read_parquet(shard_dir / "0*.parquet")
    assert rows.height == N_TRAIN + sum(FAILING.values())
    failed = duckdb.sql(f"select count(*) from '{shard_dir}/0*.parquet' where status != 'success' "
                        "and error_message is not null").fetchall()[0][0]
    assert failed == sum(FAILING.values())

    manifest = json.loads((base / "root" / "manifest.json").read_text())
    assert manifest["stages"]["shard"]["counts"] == counts
    assert manifest["stages"]["shard"]["versions"]["img2dataset"]
    resolved = load_config(shard_dir / "_config.yaml")
    # what was sharded: the world's url list while it was served, and otherwise the config as given
    assert resolved.shard.input.path.endswith("world/urls.tsv") and resolved.shard.input.format == "cc12m"
    assert resolved.model_copy(update={"shard": config.shard}) == config


@pytest.mark.slow
def test_rerun_skips_complete_shards_and_redoes_a_partial_one(sharded, tmp_path):
    config, first, base = sharded
    root = tmp_path / "root"
    shutil.copytree(base / "root", root)
    shards = root / "shards"
    # A kill in the middle of shard 1: its tar half written, its stats never written.
    (shards / "00001_stats.json").unlink()
    tar = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(tar[: len(tar) // 2])
    untouched = {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[02]*")}
    time.sleep(0.01)

    again = run_shard(config.model_copy(update={"root": str(root)}))
    assert again["counts"] == first["counts"]
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[02]*")} == untouched
    assert (shards / "00001_stats.json").exists()
    assert len(read_samples(shards)) == N_TRAIN


def in_key_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda name: name.partition(".")[::2])


def as_killed_during_the_rewrite(shard) -> dict:
    """A shard as img2dataset left it: tar and parquet in download order (the time in each tar header), its
    stats unmarked; and a temporary file half written. Returns the stats."""
    with tarfile.open(shard.with_suffix(".tar")) as t:
        samples = {}
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = t.extractfile(m).read()
    with wds.TarWriter(str(shard.with_suffix(".tar")), encoder=False) as sink:
        for key in sorted(samples, reverse=True):
            sink.write(samples[key])
    rows = pq.read_table(shard.with_suffix(".parquet"))
    pq.write_table(rows.take(list(reversed(range(rows.num_rows)))), shard.with_suffix(".parquet"))
    stats_path = shard.parent / f"{shard.name}_stats.json"
    stats = {k: v for k, v in json.loads(stats_path.read_text()).items() if k not in ("canonical", "canonical_seconds")}
    stats_path.write_text(json.dumps(stats))
    shard.with_suffix(".tar.tmp").write_bytes(b"\0" * 5000)
    return stats


@pytest.mark.slow
def test_shards_are_canonical_and_a_killed_rewrite_is_finished_without_a_download(sharded, tmp_path, capsys):
    config, first, base = sharded
    for tar in sorted((base / "root" / "shards").glob("0*.tar")):
        with tarfile.open(tar) as t:
            members = t.getmembers()
        assert [m.name for m in members] == in_key_order([m.name for m in members])
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "softcurate", "softcurate", 0o444)}
        keys = pl.read_parquet(tar.with_suffix(".parquet"))["key"].to_list()
        assert keys == sorted(keys)

    root = tmp_path / "root"
    shutil.copytree(base / "root", root)
    shard = root / "shards" / "00001"
    canonical = {ext: shard.with_suffix(ext).read_bytes() for ext in (".tar", ".parquet")}

    def finished(stats):
        assert {ext: shard.with_suffix(ext).read_bytes() for ext in (".tar", ".parquet")} == canonical
        marked = json.loads((root / "shards" / "00001_stats.json").read_text())
        assert marked["canonical"] and marked["start_time"] == stats["start_time"]  # rewritten, not downloaded again
        assert not list((root / "shards").glob("*.tmp"))

    # The worker died during the rewrite and Dask runs the task again: img2dataset has deleted its input shard.
    def no_download(row):
        raise AssertionError("downloaded again")

    stats = as_killed_during_the_rewrite(shard)
    assert CanonicalShards(no_download, str(root / "shards"))((1, "deleted.feather")) == (True, (1, "deleted.feather"))
    finished(stats)

    # The whole run died during the rewrite: the re-run finishes it.
    stats = as_killed_during_the_rewrite(shard)
    capsys.readouterr()
    again = run_shard(config.model_copy(update={"root": str(root)}))
    assert again["counts"] == first["counts"] and not again["incomplete_shards"]
    assert "3 shards, 3 already complete, 0 to do" in capsys.readouterr().out
    finished(stats)


@pytest.mark.slow
def test_refuses_to_resume_from_another_split(sharded, tmp_path):
    config, _, base = sharded
    root = tmp_path / "root"
    shutil.copytree(base / "root", root)
    other = config.model_copy(update={"root": str(root), "shard": ShardConfig(**{
        **config.shard.model_dump(), "samples_per_shard": 50})})
    with pytest.raises(ConfigError, match="holds the output of another samples_per_shard"):
        run_shard(other)


@pytest.mark.slow
def test_real_cc3m_rows_through_the_cli(cc3m_tsv, sharded, tmp_path):
    """A copy of the real CC3M list, its urls pointed at loopback images; captions must survive as they are."""
    _, _, base = sharded
    lines = cc3m_tsv.read_text(encoding="utf-8").splitlines()[:120]
    with serve_world(str(base / "world")) as url:
        rewritten = [f"{line.split(chr(9))[0]}\t{url}/images/{i:07d}.jpg" for i, line in enumerate(lines)]
        rewritten += [f"a caption whose image is gone\t{url}/fail/404/x.jpg", "no url here\t", "ftp caption\tftp://x/y.jpg"]
        (tmp_path / "cc3m.tsv").write_text("\n".join(rewritten) + "\n", encoding="utf-8")
        result = subprocess.run(
            [str(BIN / "softcurate"), "shard", "--input", str(tmp_path / "cc3m.tsv"), "--root", str(tmp_path / "out"),
             "--processes", "1", "--threads", "8", "--image-size", "64", "--samples-per-shard", "50", "--timeout", "5",
             "--allow-private-urls"],
            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "123 input rows = 120 samples + 3 failures (reconciled)" in result.stdout
    samples = read_samples(tmp_path / "out" / "shards")
    captions = {s["json"]["row"]: s["txt"] for s in samples}
    assert captions == {i: line.split("\t")[0] for i, line in enumerate(lines)}


@pytest.mark.slow
def test_existing_dask_cluster_gives_the_same_counts(sharded, tmp_path):
    config, local, _ = sharded
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                    "--no-dashboard", "--host", "127.0.0.1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        remote = run_shard(config.model_copy(update={"root": str(tmp_path / "root"), "shard": ShardConfig(**{
            **config.shard.model_dump(), "scheduler": address})}))
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert remote["counts"] == local["counts"]
    assert remote["failures_by_reason"] == local["failures_by_reason"]


def test_failure_reasons_are_grouped_without_addresses():
    assert failure_reason("HTTP Error 404: Not Found") == "http 404"
    assert failure_reason("<urlopen error timed out>") == "timeout"
    assert failure_reason("The read operation timed out") == "timeout"
    assert failure_reason("IncompleteRead(1021 bytes read, 1022 more expected)") == "truncated download"
    assert failure_reason("Image decoding error") == "not an image"
    assert failure_reason("weird <object at 0x7f00ab12> 42") == "weird <object at N> N"


def test_shard_help_documents_every_option():
    out = subprocess.run([str(BIN / "softcurate"), "shard", "--help"], capture_output=True, text=True).stdout
    flags = {"path": "--input"}
    for section in (ShardConfig.model_fields, ShardConfig.model_fields["input"].annotation.model_fields):
        for name, field in section.items():
            if name == "input":
                continue
            flag = flags.get(name, "--" + name.replace("_", "-"))
            assert flag in out, flag
            assert field.description.split()[0] in out


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("shard:\n  proceses: 2\n")
    result = subprocess.run([str(BIN / "softcurate"), "shard", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"softcurate shard: error: {bad}: unknown key 'shard.proceses' "
                                     "(did you mean 'processes'?)")
    result = subprocess.run([str(BIN / "softcurate"), "shard", "--input", str(tmp_path / "none.tsv"),
                             "--root", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "none.tsv" in result.stderr
