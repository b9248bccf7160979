"""What the score stage's Dask tasks run on the workers: teacher embeddings of a shard, and its scores.

Each worker loads the teacher(s) and reads the neighbour indexes once and keeps them for every
task it gets.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from curate import neighbours as nn
from curate.dn import dn_center, normalise
from curate.policies import NumericKeys
from curate.scores import clean_probability, cosine_score, pair_loss, pair_losses, pair_posterior
from curate.teacher import (
    BadSample,
    embed,
    embed_captions,
    fast_path,
    load_sentence_teacher,
    logit_scale,
    prepare,
    stack_images,
)
from pipelines.config import ConfigError
from pipelines.io import read_shard, read_table, write_table

_TEACHERS: dict = {}
MISSING = "missing from the tar (truncated or corrupt shard)"


def load_teachers(spec: dict) -> dict:
    """The teacher models, loaded once per process (worker) and kept."""
    key = (spec["model"], tuple(spec["checkpoints"]), spec["sentence_teacher"], spec["device"])
    if key not in _TEACHERS:
        from train.models import create_model

        device = torch.device(spec["device"])
        models, scales = [], []
        for checkpoint in spec["checkpoints"]:
            try:
                model, _, preprocess, tokenizer = create_model(spec["model"], checkpoint, device)
            except (ValueError, FileNotFoundError, RuntimeError) as err:
                raise ConfigError(f"score: cannot load the teacher {spec['model']} from {checkpoint}: "
                                  f"{str(err).splitlines()[0]}") from None
            models.append(model.eval())
            scales.append(logit_scale(model))
        text = None
        if spec["sentence_teacher"]:
            try:
                text = load_sentence_teacher(spec["sentence_teacher"], spec["device"])
            except Exception as err:
                raise ConfigError(f"score: cannot load the text teacher {spec['sentence_teacher']}: {err}") from None
        _TEACHERS.clear()  # one teacher per worker at a time
        _TEACHERS[key] = {"models": models, "scales": scales, "preprocess": preprocess, "tokenizer": tokenizer,
                          "fast": fast_path(models[0]),
                          "text": text, "device": device}
    return _TEACHERS[key]


def embed_shard(url: str, out: str, spec: dict, batch_size: int, threads: int, decode_workers: int = 0) -> dict:
    """Teacher embeddings of one shard (every checkpoint), failures kept as rows with their reason.

    `decode_workers` processes decode and preprocess the batches ahead of the forward (0: one thread,
    one batch ahead); the batches reach the teacher in shard order, so the bytes do not depend on them.
    """
    started = time.time()
    torch.set_num_threads(threads)
    teacher = load_teachers(spec)
    samples = read_shard(url)
    listed = listed_rows(url)
    samples = sorted(samples + missing_samples(listed, {s["__key__"] for s in samples}), key=lambda s: s["__key__"])
    keys = [s["__key__"] for s in samples]
    rows = [sample_row(s, listed) for s in samples]
    errors: list[str | None] = [None] * len(samples)
    good: list[int] = []
    captions: list[str] = []
    dims = [m.visual.output_dim for m in teacher["models"]]  # the schema of a shard with no good sample
    embeddings = [([], []) for _ in teacher["models"]]
    batches = [[(i, samples[i]) for i in range(s, min(s + batch_size, len(samples)))]
               for s in range(0, len(samples), batch_size)]
    for done in decoded(batches, teacher, decode_workers):
        for i, reason in done["errors"].items():
            errors[i] = reason
        if not done["indices"]:
            continue
        good += done["indices"]
        captions += done["captions"]
        for model, (image_out, text_out) in zip(teacher["models"], embeddings):
            v, t = embed(model, done["images"], done["tokens"], teacher["device"], spec["bf16"])
            image_out.append(v)
            text_out.append(t)
    columns = {"key": pa.array(keys, pa.string()), "row": pa.array(rows, pa.int64()),
               "status": pa.array(["failed" if e else "scored" for e in errors], pa.string()),
               "error": pa.array(errors, pa.string())}
    for j, (image_out, text_out) in enumerate(embeddings):
        dim = image_out[0].shape[1] if image_out else dims[j]
        columns[f"image_emb_{j}"] = scatter(image_out, good, len(samples), dim)
        columns[f"text_emb_{j}"] = scatter(text_out, good, len(samples), dim)
    if teacher["text"] is not None:
        sentence = [embed_captions(teacher["text"], captions)] if captions else []
        text = teacher["text"]  # sentence-transformers renamed the method in 6.x; 3.x-5.x have only the old name
        width = (getattr(text, "get_embedding_dimension", None) or text.get_sentence_embedding_dimension)()
        columns["sentence_emb"] = scatter(sentence, good, len(samples), width)
    write_table(out, pa.table(columns))
    return {"shard": os.path.basename(url), "samples": len(samples), "scored": len(good),
            "failed": len(samples) - len(good), "seconds": time.time() - started}


_DECODE: dict = {}  # in a decode process: the teacher's preprocess, tokenizer and fast path
_DECODERS: dict = {}  # in a Dask worker: its decode processes, kept across tasks


def decode_batch(batch: list[tuple[int, dict]], parts: dict | None = None) -> dict:
    """One batch of (index, sample) decoded, preprocessed and tokenised; the failures with their reason."""
    parts = parts or _DECODE
    done, errors = [], {}
    for i, sample in batch:
        try:
            if sample.get("__missing__"):
                raise BadSample(MISSING)
            done.append((i, *prepare(sample, parts["preprocess"], parts["fast"])))
        except BadSample as err:
            errors[i] = str(err)
    captions = [d[2] for d in done]
    return {"indices": [d[0] for d in done], "captions": captions, "errors": errors,
            "images": stack_images([d[1] for d in done], parts["fast"]) if done else None,
            "tokens": parts["tokenizer"](captions) if done else None}


def start_decoder(parts: dict) -> None:
    torch.set_num_threads(1)  # one core per decode process
    _DECODE.update(parts)
    threading.Thread(target=exit_with, args=(os.getppid(),), daemon=True).start()


def exit_with(parent: int) -> None:
    """A decode process ends with its worker: a nanny kills a worker slow to exit, and kill -9 runs no cleanup."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def decoded(batches: list, teacher: dict, workers: int):
    """decode_batch of each batch, in order, `workers` processes ahead of the caller (0: one thread, one batch ahead).

    A daemonic process (a Dask worker not started by pipelines.distributor) cannot have children:
    there the decode runs in `workers` threads (PIL releases the GIL for part of the decode).
    """
    parts = {k: teacher[k] for k in ("preprocess", "tokenizer", "fast")}
    if workers and not multiprocessing.current_process().daemon:
        yield from in_order(decoder_pool(parts, workers), decode_batch, batches, ahead=2 * workers)
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        yield from in_order(pool, partial(decode_batch, parts=parts), batches, ahead=max(1, workers))


def decoder_pool(parts: dict, workers: int) -> ProcessPoolExecutor:
    """The worker's decode processes, started once (spawned: a fork of a threaded Dask worker may deadlock)."""
    key = (id(parts["preprocess"]), workers)
    if key not in _DECODERS:
        for pool in _DECODERS.values():
            pool.shutdown(cancel_futures=True)
        _DECODERS.clear()
        _DECODERS[key] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=start_decoder, initargs=(parts,))
    return _DECODERS[key]


def in_order(pool, fn, items: list, ahead: int):
    """fn of each item run in `pool`, the results in the items' order, at most `ahead` + 1 in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def listed_rows(url: str) -> dict[str, int | None]:
    """The samples the shard's parquet lists as successes, by key, with their row in the url list; {} for a
    shard made elsewhere (only its tar is known)."""
    fs, path = fsspec.core.url_to_fs(url.removesuffix(".tar") + ".parquet")
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
        f.seek(0)
        table = pq.read_table(f, columns=[c for c in ("key", "status", "row") if c in names], use_threads=False)
    rows = table.column("row").to_pylist() if "row" in table.column_names else [None] * table.num_rows
    return {key: row for key, status, row in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), rows)
            if status == "success"}


def missing_samples(listed: dict[str, int | None], read: set[str]) -> list[dict]:
    """Stubs for the listed samples that the tar did not yield.

    A truncated or corrupt tar ends early (webdataset warns and goes on): each sample it lost
    becomes a failure row with its reason, never a silently shorter shard.
    """
    return [{"__key__": key, "__missing__": True} for key in listed if key not in read]


def sample_row(sample: dict, listed: dict[str, int | None]) -> int | None:
    """A sample's row in the url list: from its json, or, for one the tar lost or cut short, from the shard's parquet."""
    try:
        return json.loads(sample["json"])["row"]
    except (KeyError, ValueError, TypeError):
        return listed.get(sample["__key__"])


def scatter(parts: list[np.ndarray], good: list[int], n: int, dim: int) -> pa.Array:
    """float16 fixed-size lists, one per sample, null where the sample failed."""
    values = np.zeros((n, dim), dtype=np.float16)
    if parts:
        values[good] = np.concatenate(parts).astype(np.float16)
    mask = np.ones(n, dtype=bool)
    mask[good] = False
    flat = pa.array(values.ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(mask))


def column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size-list column as a float64 (n, d) array."""
    col = table.column(name).combine_chunks()
    size = col.type.list_size
    values = col.values.slice(col.offset * size, len(col) * size)  # null rows keep their (zero) slots
    return values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), size)


def scored_embeddings(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The normalised embeddings of a file's scored rows and their keys as integer ids."""
    table = read_table(path, ["key", "status", name])
    table = table.filter(pc.equal(table["status"], "scored"))
    return normalise(column(table, name)), key_ids(table["key"].to_pylist())


def key_ids(keys: list[str]) -> np.ndarray:
    """img2dataset keys are zero-padded shard and sample numbers, so each is also an int64 id."""
    return NumericKeys().ids(pl.Series(keys, dtype=pl.String))


def score_shard(embed_path: str, out: str, state: dict, search: dict, threads: int) -> dict:
    started = time.time()
    torch.set_num_threads(threads)
    table = read_table(embed_path)
    scored = np.asarray([s == "scored" for s in table["status"].to_pylist()], dtype=bool)
    keys = table["key"].to_pylist()
    good = table.filter(pa.array(scored))
    good_keys = good["key"].to_pylist()
    bank_keys = np.asarray(state["bank_keys"])
    self_in_bank = np.asarray(good_keys)[:, None] == bank_keys[None, :] if good_keys else None
    lam = state["lambda"]
    logs, losses = [], []
    for j, ck in enumerate(state["checkpoints"]):
        v = dn_center(column(good, f"image_emb_{j}"), ck["mu_v"], lam)
        t = dn_center(column(good, f"text_emb_{j}"), ck["mu_t"], lam)
        log_i2t, log_t2i = pair_posterior(v, t, ck["bank_v"], ck["bank_t"], ck["scale"], self_in_bank)
        logs.append((log_i2t, log_t2i))
        losses.append(pair_loss(log_i2t, log_t2i))
    loss = pair_losses(state["teacher"], state["averaged"], losses, good_keys)
    v0, t0 = normalise(column(good, "image_emb_0")), normalise(column(good, "text_emb_0"))
    ck0 = state["checkpoints"][0]
    fields = {
        "cosine": cosine_score(v0, t0),
        "dn_score": (dn_center(v0, ck0["mu_v"], lam) * dn_center(t0, ck0["mu_t"], lam)).sum(-1),
        "p_i2t": np.exp(logs[0][0]), "p_t2i": np.exp(logs[0][1]),
        "loss": loss,
        "clean_prob": clean_probability(state["mixture"], loss),
    }
    columns = {"key": table["key"], "row": table["row"], "status": table["status"], "error": table["error"],
               "teacher_image_emb": table["image_emb_0"], "teacher_text_emb": table["text_emb_0"]}
    if "sentence_emb" in table.column_names:
        columns["sentence_emb"] = table["sentence_emb"]
    where = np.flatnonzero(scored)
    for name, values in fields.items():
        columns[name] = spread(values, where, len(keys), pa.float32())
    if len(losses) > 1:
        per = np.stack(losses, axis=1).astype(np.float32)
        columns["loss_by_checkpoint"] = spread_lists(per, where, len(keys), pa.float32())
    if search["method"] != "none":
        width = len(keys[0]) if keys else 0
        for side, name in (("image", "image_emb_0"), ("text", "text_emb_0")):
            queries = normalise(column(good, name))
            sims, ids = nn.index_topk(cached_index(search[side], search[f"{side}_built"]), queries.astype(np.float32), state["k"],
                                      query_ids=key_ids(good_keys), nprobe=search["nprobe"])
            columns[f"{side}_nn_keys"] = spread_lists(np.asarray([[f"{i:0{width}d}" if i >= 0 else None for i in row]
                                                                  for row in ids], dtype=object), where, len(keys), pa.string())
            columns[f"{side}_nn_sims"] = spread_lists(sims.astype(np.float32), where, len(keys), pa.float32())
    write_table(out, pa.table(columns))
    return {"shard": os.path.basename(out), "seconds": time.time() - started, "scored": int(scored.sum())}


_INDEXES: dict = {}


def cached_index(path: str, built: int):
    """Each worker reads each index once, not once per task."""
    key = (path, built)
    if key not in _INDEXES:
        _INDEXES.clear()
        with fsspec.open(path, "rb") as f:
            _INDEXES[key] = nn.deserialize_index(f.read())
    return _INDEXES[key]


def spread(values: np.ndarray, where: np.ndarray, n: int, kind) -> pa.Array:
    """Values of the scored rows into a column of all rows, null for failed ones."""
    full = np.zeros(n, dtype=np.float64)
    full[where] = values
    mask = np.ones(n, dtype=bool)
    mask[where] = False
    return pa.array(full, type=kind, mask=mask, from_pandas=False)


def spread_lists(values: np.ndarray, where: np.ndarray, n: int, kind) -> pa.Array:
    rows: list = [None] * n
    for i, row in zip(where, values):
        rows[i] = list(row)
    return pa.array(rows, type=pa.list_(kind))
