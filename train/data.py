"""The WebDataset pipeline the train stage reads: shards -> decoded, tokenised, score-joined batches.

Shards are those of the shard stage (img2dataset's layout). When training reads scores (a loss's
score_fields, a clean_prob filter), each sample is joined by key with its row of the score stage's
NNNNN.parquet for shard NNNNN.tar (in `train.scores`, by default the `scores/` beside `shards/`) and
may be filtered on clean_prob.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from functools import partial

import braceexpand
import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen_schemes

from curate.teacher import IMAGE_EXTS

FSSPEC_SCHEMES = ("s3", "s3a", "gcs", "az", "abfs", "abfss", "memory", "hdfs", "webhdfs")


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return fsspec.open(url, mode).open()


# webdataset opens local paths, pipe:, http(s) and gs by itself; object stores go through fsspec,
# like every other read and write of softcurate.
for _scheme in FSSPEC_SCHEMES:
    gopen_schemes.setdefault(_scheme, gopen_fsspec)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace notation (`shards/{00000..00009}.tar`) and `::`-separated lists, as open_clip_train takes."""
    parts = urls if isinstance(urls, list) else urls.split("::")
    return [u for part in parts for u in braceexpand.braceexpand(part)]


def shard_samples(url: str) -> int:
    """Samples in one shard, from img2dataset's stats (no need to read the tar)."""
    stats_path = url.removesuffix(".tar") + "_stats.json"
    try:
        with fsspec.open(stats_path, "r") as f:
            return json.load(f)["successes"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{stats_path}: missing; is {url} a shard of the shard stage?") from None


def has_captions(url: str, members: int = 1000) -> bool:
    """Whether a shard's first samples carry a caption (txt): read as a stream, the first members only."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for _, member in zip(range(members), tar):
            if member.name.endswith(".txt"):
                return True
    return False


def count_samples(urls: list[str]) -> int:
    return sum(shard_samples(url) for url in urls)


def tar_is_complete(url: str) -> bool:
    """A tar ends with its end-of-archive marker (two zero blocks); one cut short (a killed copy or
    write) does not, and would pass for a shorter shard. Reads only the last 1 KiB."""
    if url.startswith("pipe:"):
        return True  # a stream: nothing to check before reading it
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return True  # not ours to report: reading its stats says what is missing
    size = fs.size(path)
    return size >= 1024 and size % 512 == 0 and not any(fs.cat_file(path, start=size - 1024, end=size))


def nonempty_shards(urls: str | list[str]) -> list[str]:
    """The shards that hold samples: resampling an empty one (every url failed) would spin forever.

    A truncated tar is left out and counted in a warning: never taken as a complete shard."""
    urls = expand_urls(urls)
    truncated = [url for url in urls if not tar_is_complete(url)]
    if truncated:
        logging.warning("left out %d truncated shard(s) (no end-of-archive marker; re-run the shard stage): %s",
                        len(truncated), ", ".join(truncated[:5]) + (" ..." if len(truncated) > 5 else ""))
    kept = [url for url in urls if url not in truncated and shard_samples(url) > 0]
    if not kept:
        raise ValueError(f"no samples in {urls[0]}" + (f" or the {len(urls) - 1} other shards" if len(urls) > 1 else ""))
    return kept


def scores_path(shard_url: str, scores: str | None = None) -> str:
    """A shard's scores file: NNNNN.parquet in the `scores` folder, by default the `scores/` beside `shards/`."""
    if scores:
        return f"{scores.rstrip('/')}/{shard_url.rpartition('/')[2].removesuffix('.tar')}.parquet"
    head, _, name = shard_url.rpartition("/shards/")
    return f"{head}/scores/{name.removesuffix('.tar')}.parquet"


def scores_by_key(path: str, columns: tuple[str, ...] | None = None) -> dict[str, dict] | None:
    """One shard's scores by key (those of `columns` the file has), or None when the score stage has
    not written them.

    pyarrow without threads, not polars: this runs in forked data workers, where a thread pool
    inherited from the parent can deadlock.
    """
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        file = pq.ParquetFile(f)
        names = file.schema_arrow.names
        if "key" not in names:
            raise ValueError(f"{path}: a scores file must have a 'key' column; it has {names}")
        table = file.read(columns=[c for c in columns if c in names] if columns else None, use_threads=False)
    return {row["key"]: row for row in table.to_pylist()}


def check_scores(urls: list[str], columns: list[str] = (), scores: str | None = None) -> None:
    """Before training on scores: every shard has a scores file with `columns` that covers every one of its samples."""
    for url in urls:
        path = scores_path(url, scores)
        rows = scores_by_key(path, ("key",))
        if rows is None:
            raise FileNotFoundError(f"{path}: missing; the loss needs the score stage's output for {url}")
        with fsspec.open(path, "rb") as f:
            absent = [c for c in columns if c not in pq.ParquetFile(f).schema_arrow.names]
        if absent:
            raise ValueError(f"{path} has no {', '.join(absent)}, which training reads; re-run the score stage with "
                           "the setting that writes it (sentence_emb: score.sentence_teacher)")
        with fsspec.open(url.removesuffix(".tar") + ".parquet", "rb") as f:
            shard = pq.read_table(f, columns=["key", "status"], use_threads=False).to_pydict()
        keys = {k for k, status in zip(shard["key"], shard["status"]) if status == "success"}
        missing = sorted(keys - rows.keys())
        if missing:
            raise KeyError(f"{path}: no scores for {len(missing)} of the {len(keys)} samples of {url} "
                           f"(e.g. {missing[:3]}); is it a scores file of another run?")


class ScoreJoin:
    """Adds each sample's scores row (only `columns`: the neighbour lists and the other scores would triple
    the cost of loading a shard's scores in each worker); holds one shard's table at a time (samples
    arrive shard by shard)."""

    def __init__(self, required: bool, columns: tuple[str, ...], scores: str | None = None):
        self.required, self.columns, self.scores, self.path, self.rows = required, columns, scores, None, None

    def __call__(self, sample: dict) -> dict:
        path = scores_path(sample["__url__"], self.scores)
        if path != self.path:
            self.path, self.rows = path, scores_by_key(path, self.columns)
        row = self.rows.get(sample["__key__"]) if self.rows is not None else None
        if row is None and self.required:
            raise KeyError(f"{sample['__url__']}: no scores for sample {sample['__key__']}")
        sample["scores"] = row
        return sample


class KeepList:
    """The curate stage's keep.parquet: only kept pairs pass, each with its weight (loaded once per worker)."""

    def __init__(self, path: str):
        self.path, self.weights = path, None

    def load(self) -> dict[str, float]:
        if self.weights is None:
            with fsspec.open(self.path, "rb") as f:
                table = pq.read_table(f, columns=["key", "keep", "weight"], use_threads=False).to_pydict()
            self.weights = {k: w for k, keep, w in zip(table["key"], table["keep"], table["weight"]) if keep}
        return self.weights

    def __call__(self, sample: dict) -> bool:
        weight = self.load().get(sample["__key__"])
        sample["weight"] = weight
        return weight is not None


def keep_list_summary(path: str) -> tuple[int, int, bool]:
    """(kept, pairs, weighted) of a keep-list, for the train stage's checks before the first step."""
    with fsspec.open(path, "rb") as f:
        table = pq.read_table(f, columns=["keep", "weight"], use_threads=False).to_pydict()
    kept = [w for keep, w in zip(table["keep"], table["weight"]) if keep]
    return len(kept), len(table["keep"]), any(w != 1.0 for w in kept)


def collate(samples: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings (keys) as lists; score fields become tensors."""
    batch = {"key": [s["__key__"] for s in samples], "skipped": sum(s.get("skipped", 0) for s in samples)}
    if samples and samples[0].get("weight") is not None:
        batch["weight"] = torch.tensor([s["weight"] for s in samples], dtype=torch.float32)
    for name in ("image", "text"):
        if isinstance(samples[0].get(name), torch.Tensor):
            batch[name] = torch.stack([s[name] for s in samples])
    rows = [s.get("scores") for s in samples]
    if rows and all(r is not None for r in rows):
        for name, value in rows[0].items():
            if isinstance(value, (int, float)):
                batch[name] = torch.tensor([r[name] for r in rows], dtype=torch.float32)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                batch[name] = torch.from_numpy(np.asarray([r[name] for r in rows], dtype=np.float32))
    return batch


def worker_seed(seed: int, epoch: int) -> int:
    """Distinct per rank and worker, reproducible per (seed, epoch): what exact resume relies on."""
    return wds.utils.make_seed(seed, epoch, wds.utils.pytorch_worker_seed())


def make_pipeline(urls: str | list[str], preprocess, tokenizer, batch_size: int, *, seed: int = 0,
                  epoch: int = 0, batches_per_worker: int | None = None, shuffle_buffer: int = 1000,
                  min_clean_prob: float | None = None, require_scores: bool = False, score_columns: tuple[str, ...] = (),
                  modality: str = "pair", keep_list: str | None = None, complete_only: bool = False,
                  scores: str | None = None) -> wds.DataPipeline:
    """The webdataset idiom: shard list -> split by node and worker -> samples -> decode -> batch.

    With `batches_per_worker` (training) shards are resampled with a seed of (seed, epoch, rank,
    worker) and each worker yields exactly that many full batches, so every rank takes the same
    number of steps and an epoch replays identically; without it (evaluation) every sample is read
    once, split by node and worker, the last batch partial. `modality` "image" or "text" makes an
    unpaired stream of one side only (MMCL's unpaired pools); `complete_only` passes over samples that
    lack a side without counting them (a pool's image-only rows, when reading its rows as pairs).
    """
    shards = expand_urls(urls)
    training = batches_per_worker is not None
    if training:
        stages = [wds.ResampledShards(shards, worker_seed=partial(worker_seed, seed, epoch), deterministic=True)]
    else:
        stages = [wds.SimpleShardList(shards), wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=wds.warn_and_continue)]
    if complete_only:
        stages.append(wds.select(partial(has_fields, modality)))
    # select and join while samples still arrive shard by shard: after the shuffle, neighbours come
    # from different shards and ScoreJoin would reload a scores file for almost every sample
    if keep_list:
        stages.append(wds.select(KeepList(keep_list)))
    if require_scores or min_clean_prob is not None:
        stages.append(wds.map(ScoreJoin(True, ("key", "clean_prob", *score_columns), scores)))
    if min_clean_prob is not None:
        stages.append(wds.select(lambda s: s["scores"]["clean_prob"] >= min_clean_prob))
    stages += [wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed * 7919 + epoch))] \
        if training else []
    stages += [
        partial(decode_samples, preprocess, tokenizer, modality),
        wds.batched(batch_size, partial=not training, collation_fn=collate),
    ]
    pipeline = wds.DataPipeline(*stages)
    return pipeline.with_epoch(batches_per_worker) if training else pipeline


def has_fields(modality: str, sample: dict) -> bool:
    has_image = any(ext in sample for ext in IMAGE_EXTS)
    return {"pair": has_image and "txt" in sample, "image": has_image, "text": "txt" in sample}[modality]


def decode_samples(preprocess, tokenizer, modality: str, samples):
    """Decode each sample; one that lacks a side or does not decode is skipped and counted, never fatal.

    The count rides on the next good sample ("skipped"), so it reaches the loop from every worker.
    """
    skipped = 0
    for sample in samples:
        try:
            if not has_fields(modality, sample):
                raise ValueError("no image or no caption")
            out = decode(preprocess, tokenizer, modality, sample)
        except Exception as err:  # a corrupt image or caption of the web: count it and go on
            skipped += 1
            logging.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), err)
            continue
        out["skipped"], skipped = skipped, 0
        yield out


def decode(preprocess, tokenizer, modality: str, sample: dict) -> dict:
    """Only the side(s) asked for are decoded."""
    out = {"__key__": sample["__key__"], "scores": sample.get("scores"), "weight": sample.get("weight")}
    if modality in ("pair", "image"):
        data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        with Image.open(io.BytesIO(data)) as image:
            out["image"] = preprocess(image.convert("RGB"))
    if modality in ("pair", "text"):
        out["text"] = tokenizer([sample["txt"].decode("utf-8")])[0]
    return out
