"""The whole chain on object storage: root = s3://bucket/run on a real S3 endpoint (moto's server on
loopback, s3fs through fsspec), shard -> score -> audit -> curate --export -> train, against the same
chain on local disk. The demo world stays local (its server serves files); only the stage outputs
live in the bucket."""

import io
import json
import logging
import os
import tarfile

import fsspec
import open_clip
import polars as pl
import pytest
import torch
from conftest import free_port, run_shard

from pipelines.audit import run_audit
from pipelines.config import ConfigError, ShardConfig, load_config
from pipelines.curate import run_curate
from pipelines.score import run_score
from pipelines.train import run_train
from train.models import create_model, save_checkpoint

pytestmark = pytest.mark.slow
N = 150
FAILING = '{"http_404": 2, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0}'


@pytest.fixture(scope="module")
def bucket():
    """A moto S3 server on 127.0.0.1 with one bucket; the env vars s3fs (and the Dask workers) read."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # set before any LocalCluster starts: its worker processes inherit them
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bucket")
    yield "s3://bucket"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def config_for(root, world, teacher, *extra):
    overrides = [f"root={root}", f"world.dir={world}", f"world.n_train={N}", "world.n_val=20", "world.n_test=2",
                 f"world.failing_urls={FAILING}", "shard.processes=1", "shard.threads=8", "shard.samples_per_shard=60",
                 "shard.image_size=64", f"score.checkpoints=[{teacher}]", "score.processes=1", "score.batch_size=64",
                 "curate.policy=[{kind: clean_prob, min: 0.5}, {kind: reweight, by: clean_prob}]", "curate.samples_per_shard=50",
                 "train.name=student", "train.batch_size=16", "train.max_steps=3", "train.checkpoint_every=2",
                 "train.workers=1", "train.threads=1", "train.warmup_steps=1", "train.log_every=1",
                 f"train.keep_list={root}/curated/keep.parquet"]
    if "allow_private_urls" in ShardConfig.model_fields:  # the demo world is served on loopback
        overrides.append("shard.allow_private_urls=true")
    return load_config(None, [*overrides, *extra])


def chain(root, world, teacher):
    """shard -> score -> audit -> curate (export) -> train a few steps, on one root; each stage's result."""
    config = config_for(root, world, teacher)
    return {"shard": run_shard(config), "score": run_score(config), "audit": run_audit(config),
            "curate": run_curate(config, export=True), "train": run_train(config)}


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """The same chain on local disk and in the bucket, on one local world and one teacher."""
    base = tmp_path_factory.mktemp("object_store")
    torch.manual_seed(0)
    model, *_ = create_model("softcurate-tiny")  # an untrained teacher: the scores only need to be the same
    save_checkpoint(model, base / "teacher.pt")
    fsspec.open(f"{bucket}/teacher.pt", "wb").open().write((base / "teacher.pt").read_bytes())
    local = chain(base / "local", base / "world", base / "teacher.pt")
    remote = chain(f"{bucket}/run", base / "world", f"{bucket}/teacher.pt")  # the teacher read from the store too
    return base / "local", f"{bucket}/run", local, remote, base


def read(url):
    with fsspec.open(str(url), "rb") as f:
        return f.read()


def test_shards_hold_the_same_samples(runs):
    local, remote, a, b, _ = runs
    assert a["shard"]["counts"] == b["shard"]["counts"] and a["shard"]["shards"] == b["shard"]["shards"]
    assert b["shard"]["counts"]["input_rows"] == N + 2 and b["shard"]["counts"]["successes"] == N
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.glob(remote.removeprefix("s3://") + "/shards/*.tar")) == a["shard"]["shards"]
    for name in a["shard"]["shards"]:
        table = name.removesuffix(".tar") + ".parquet"
        keys = [pl.read_parquet(io.BytesIO(read(f"{root}/shards/{table}"))).sort("key").select("key", "status", "row")
                for root in (local, remote)]
        assert keys[0].equals(keys[1])


def test_scores_and_keep_list_are_byte_identical(runs):
    local, remote, a, b, _ = runs
    for name in a["shard"]["shards"]:
        table = name.removesuffix(".tar") + ".parquet"
        assert read(f"{local}/scores/{table}") == read(f"{remote}/scores/{table}"), table
    assert read(f"{local}/curated/keep.parquet") == read(f"{remote}/curated/keep.parquet")
    assert a["curate"]["kept"] == b["curate"]["kept"] > 0
    for kind in ("shards", "unpaired_images", "unpaired_texts"):
        assert [os.path.basename(s) for s in a["curate"]["export"][kind]["shards"]] == \
               [os.path.basename(s) for s in b["curate"]["export"][kind]["shards"]]
    images = 0
    for shard in a["curate"]["export"]["shards"]["shards"]:
        stored = members(read(f"{remote}/curated/{os.path.basename(shard)}"))
        assert members(read(shard)) == stored
        images += sum(name.endswith(".jpg") for name in stored)
    assert images == b["curate"]["kept"]


def members(tar_bytes):
    """A tar's members by name; the jsons less their url (each run served the world on its own port)."""
    found = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            found[member.name] = {k: v for k, v in json.loads(data).items() if k != "url"} if member.name.endswith(".json") \
                else data
    return found


def without_run_specifics(facts):
    """The audit facts less what names the run: timings, its root, the teacher's path (its digest stays)."""
    facts = json.loads(json.dumps(facts))
    facts.pop("title")
    facts["teacher"].pop("checkpoints")
    return facts


def test_audit_page_and_summary_are_in_the_store(runs):
    local, remote, a, b, _ = runs
    stored = json.loads(read(f"{remote}/audit/summary.json"))
    assert without_run_specifics(stored) == without_run_specifics(json.loads(read(local / "audit" / "summary.json")))
    assert stored["counts"]["reconciled"]
    assert b"<html" in read(f"{remote}/audit/index.html")[:200].lower()
    assert read(f"{remote}/audit/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_checkpoint_in_the_store_loads_in_open_clip(runs, tmp_path):
    _, remote, _, b, _ = runs
    assert b["train"]["steps"] == 3 and b["train"]["final_checkpoint"] == f"{remote}/runs/student/checkpoints/final.pt"
    fs = fsspec.filesystem("s3")
    run = remote.removeprefix("s3://") + "/runs/student"
    stored = fs.find(run)
    assert f"{run}/checkpoints/latest.pt" in stored and not [p for p in stored if p.endswith(".tmp")]
    rows = [json.loads(line) for line in read(f"{remote}/runs/student/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert fs.glob(run + "/tensorboard/events.out.tfevents.*")
    local_copy = tmp_path / "final.pt"
    local_copy.write_bytes(read(b["train"]["final_checkpoint"]))
    model, _, _ = open_clip.create_model_and_transforms("softcurate-tiny", pretrained=str(local_copy))
    state = torch.load(io.BytesIO(read(f"{remote}/runs/student/checkpoints/latest.pt")), weights_only=True)
    assert state["step"] == 3
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_a_rerun_in_the_store_resumes(runs, capsys):
    """Complete shards are found in the store (not redone); training resumes from the stored latest.pt."""
    _, remote, _, b, base = runs
    config = config_for(remote, base / "world", f"{remote.removesuffix('/run')}/teacher.pt", "train.max_steps=5")
    assert run_shard(config)["counts"] == b["shard"]["counts"]
    assert "3 already complete, 0 to do" in capsys.readouterr().out
    assert run_train(config)["steps"] == 5
    rows = [json.loads(line) for line in read(f"{remote}/runs/student/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]  # steps 1-3 once: resumed, not restarted


def test_a_world_in_the_store_is_one_clear_message(bucket):
    with pytest.raises(ConfigError, match="world.dir: the demo world must be a local folder"):  # as the config loads
        load_config(None, [f"root={bucket}/elsewhere", "world.n_train=10"])


def test_no_temporary_object_is_left_in_the_store(runs):
    _, remote, _, _, _ = runs
    stored = fsspec.filesystem("s3").find(remote.removeprefix("s3://"))
    assert len(stored) > 50 and not [p for p in stored if p.endswith(".tmp")]
