"""The train loader on shards made by the shard stage."""

import polars as pl
import pytest
import torch
from conftest import make_demo_shards

from train.data import count_samples, expand_urls, make_pipeline
from train.models import create_model

N = 120


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = make_demo_shards(tmp_path_factory.mktemp("data"), N, per_shard=50)
    _, _, preprocess, tokenizer = create_model("softcurate-tiny")
    return f"{base}/shards/{{00000..00002}}.tar", preprocess, tokenizer, base


def keys_of(pipeline):
    return [k for batch in pipeline for k in batch["key"]]


@pytest.mark.slow
def test_every_sample_once_with_the_right_shapes(shards):
    urls, preprocess, tokenizer, _ = shards
    assert len(expand_urls(urls)) == 3
    assert count_samples(expand_urls(urls)) == N
    batches = list(make_pipeline(urls, preprocess, tokenizer, batch_size=16))
    assert batches[0]["image"].shape == (16, 3, 64, 64) and batches[0]["text"].shape == (16, 32)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == N


@pytest.mark.slow
def test_worker_sharding_and_reproducible_shuffles(shards):
    urls, preprocess, tokenizer, _ = shards
    loader = torch.utils.data.DataLoader(
        make_pipeline(urls, preprocess, tokenizer, batch_size=10), batch_size=None, num_workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) == N  # each shard to one worker: nothing twice, nothing lost

    def training_keys(seed, epoch):
        pipeline = make_pipeline(urls, preprocess, tokenizer, batch_size=10, seed=seed, epoch=epoch,
                                 batches_per_worker=6, shuffle_buffer=50)
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
        batches = list(loader)
        assert len(batches) == 12 and all(len(b["key"]) == 10 for b in batches)
        return [k for b in batches for k in b["key"]]

    first = training_keys(3, 0)
    assert first == training_keys(3, 0)  # an epoch replays exactly: what resume relies on
    assert first != training_keys(3, 1) and first != training_keys(4, 0)
    assert len(set(first)) > N / 2  # resampling covers the data


@pytest.mark.slow
def test_unpaired_streams_carry_one_side(shards):
    urls, preprocess, tokenizer, _ = shards
    images = next(iter(make_pipeline(urls, preprocess, tokenizer, batch_size=5, modality="image")))
    texts = next(iter(make_pipeline(urls, preprocess, tokenizer, batch_size=5, modality="text")))
    assert images["image"].shape == (5, 3, 64, 64) and "text" not in images
    assert texts["text"].shape == (5, 32) and "image" not in texts


@pytest.mark.slow
def test_complete_only_passes_over_one_sided_rows_uncounted(shards, tmp_path):
    """MMCL's aligned batching reads the image pool's rows as pairs: image-only rows are passed over."""
    import webdataset as wds

    urls, preprocess, tokenizer, _ = shards
    samples = list(wds.WebDataset(expand_urls(urls)[0], shardshuffle=False))
    with wds.TarWriter(str(tmp_path / "pool.tar")) as tar:
        for i, sample in enumerate(samples):
            tar.write({k: v for k, v in sample.items() if k in ("__key__", "jpg") or (k == "txt" and i % 3)})
    with_captions = [s["__key__"] for i, s in enumerate(samples) if i % 3]
    batches = list(make_pipeline(str(tmp_path / "pool.tar"), preprocess, tokenizer, batch_size=8, modality="pair",
                                 complete_only=True))
    assert keys_of(batches) == with_captions
    assert all(b["image"].shape[0] == b["text"].shape[0] == len(b["key"]) for b in batches)
    assert sum(b["skipped"] for b in batches) == 0  # not failures: a pool's image-only rows
    counted = list(make_pipeline(str(tmp_path / "pool.tar"), preprocess, tokenizer, batch_size=8, modality="pair"))
    assert sum(b["skipped"] for b in counted) == len(samples) - len(with_captions)  # as failures, they would count


@pytest.mark.slow
def test_scores_joined_by_key_and_filtered(shards, tmp_path):
    urls, preprocess, tokenizer, base = shards
    (base / "scores").mkdir(exist_ok=True)
    for shard in range(3):
        keys = pl.read_parquet(base / "shards" / f"{shard:05d}.parquet").filter(pl.col("status") == "success")["key"]
        clean = [int(k) % 7 / 6 for k in keys]
        pl.DataFrame({"key": keys, "clean_prob": clean,
                      "teacher_image_emb": [[float(int(k) % 5)] * 4 for k in keys]}).write_parquet(
            base / "scores" / f"{shard:05d}.parquet")
    batches = list(make_pipeline(urls, preprocess, tokenizer, batch_size=8, require_scores=True,
                                 score_columns=("teacher_image_emb",)))
    for batch in batches:
        expected = torch.tensor([int(k) % 7 / 6 for k in batch["key"]])
        torch.testing.assert_close(batch["clean_prob"], expected)
        assert batch["teacher_image_emb"].shape == (len(batch["key"]), 4)
    kept = keys_of(make_pipeline(urls, preprocess, tokenizer, batch_size=4, min_clean_prob=0.5))
    all_keys = [k for b in batches for k in b["key"]]
    assert sorted(kept) == sorted(k for k in all_keys if int(k) % 7 / 6 >= 0.5)

    # A scores file that lacks keys stops with the shard and key named.
    pl.read_parquet(base / "scores" / "00001.parquet").head(3).write_parquet(base / "scores" / "00001.parquet")
    with pytest.raises(KeyError, match=r"00001.tar: no scores for sample"):
        list(make_pipeline(urls, preprocess, tokenizer, batch_size=4, require_scores=True))


@pytest.mark.slow
def test_fsspec_urls(shards):
    """Shards on an fsspec filesystem (memory:// here; s3:// the same way) read like local ones."""
    import fsspec

    _, preprocess, tokenizer, base = shards
    fs = fsspec.filesystem("memory")
    for name in ("00000.tar", "00000_stats.json"):
        fs.pipe(f"/bucket/shards/{name}", (base / "shards" / name).read_bytes())
    url = "memory://bucket/shards/00000.tar"
    assert count_samples([url]) == 50
    keys = keys_of(make_pipeline(url, preprocess, tokenizer, batch_size=10))
    assert len(keys) == len(set(keys)) == 50
