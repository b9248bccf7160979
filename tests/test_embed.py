"""The teacher pass over one shard: decode processes change its speed, never its bytes."""

import io
import json
import multiprocessing

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines import score_tasks
from pipelines.distributor import dask_client
from pipelines.score_tasks import embed_shard
from train.models import create_model, save_checkpoint


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A shard of 45 samples: 64 px images (the fast path), larger ones (the transforms), a broken image and an
    empty caption; and a randomly initialised tiny teacher."""
    folder = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "00000.tar")) as tar:
        for i in range(45):
            size = 64 if i % 3 else 80
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image, format="JPEG")
            jpg = b"not a jpeg" if i == 7 else image.getvalue()
            caption = "" if i == 11 else f"a photo of thing {i}"
            tar.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": caption, "json": json.dumps({"row": i}).encode()})
    save_checkpoint(create_model("softcurate-tiny")[0], folder / "teacher.pt")
    spec = {"model": "softcurate-tiny", "checkpoints": [str(folder / "teacher.pt")], "sentence_teacher": None,
            "device": "cpu", "bf16": False}
    return folder, spec


def test_same_embeddings_with_any_number_of_decode_workers(shard):
    folder, spec = shard
    outputs = {}
    for workers in (0, 1, 2):
        out = folder / f"embed_{workers}.parquet"
        summary = embed_shard(str(folder / "00000.tar"), str(out), spec, 8, 1, workers)
        assert (summary["scored"], summary["failed"]) == (43, 2)
        outputs[workers] = out.read_bytes()
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_a_daemonic_worker_decodes_in_threads_to_the_same_bytes(shard, monkeypatch):
    """A daemonic process may not start children (a Dask worker of a cluster set up elsewhere): threads instead."""
    folder, spec = shard
    embed_shard(str(folder / "00000.tar"), str(folder / "alone.parquet"), spec, 8, 1, 0)
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    monkeypatch.setattr(score_tasks, "decoder_pool", None)  # called: a TypeError
    embed_shard(str(folder / "00000.tar"), str(folder / "threads.parquet"), spec, 8, 1, 2)
    assert (folder / "threads.parquet").read_bytes() == (folder / "alone.parquet").read_bytes()


@pytest.mark.slow
def test_decode_workers_start_inside_a_dask_worker(shard):
    """The LocalCluster's workers may start the decode processes (they are not daemonic)."""
    folder, spec = shard
    embed_shard(str(folder / "00000.tar"), str(folder / "alone.parquet"), spec, 8, 1, 0)
    with dask_client(None, 1) as client:
        client.submit(embed_shard, str(folder / "00000.tar"), str(folder / "dask.parquet"), spec, 8, 1, 2).result()
        assert client.run(lambda: __import__("multiprocessing").current_process().daemon) == {
            w: False for w in client.scheduler_info()["workers"]}
    assert (folder / "dask.parquet").read_bytes() == (folder / "alone.parquet").read_bytes()
