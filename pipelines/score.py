"""The score stage: one pass of a teacher over the shards, then per-pair noise scores and neighbours.

    shards/NNNNN.tar ─▶ embed (Dask, one task per shard; the teacher loaded once per worker) ─▶ scores/_embed/NNNNN.parquet
    seeded samples of the embeddings ─▶ DN means, reference bank, mixture fit (driver; memory bounded by the samples)
    _embed/NNNNN.parquet + those globals ─▶ score (Dask, one task per shard) ─▶ scores/NNNNN.parquet ─▶ _summary.json

The tasks themselves (what runs on the workers) are in pipelines/score_tasks.py. Every file
appears whole or not at all (pipelines/io.py), rows are sorted by key and every random
choice is a seeded hash of the key, so a re-run, a resumed run and an uninterrupted one give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from functools import partial

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from dask.distributed import as_completed
from tqdm import tqdm

from curate import neighbours as nn
from curate.dn import dn_center, dn_means, normalise
from curate.scores import (
    NOISY_WHEN,
    auroc,
    cosine_score,
    detection_report,
    early_learning_end,
    estimated_noise,
    fit_mixture,
    key_ranks,
    pair_loss,
    pair_losses,
    pair_posterior,
    temperature_noise_indicator,
)
from pipelines.config import Config, ConfigError, expand_globs, glob_any, is_local, join, save_config
from pipelines.distributor import dask_client
from pipelines.io import (
    atomic_open,
    exists,
    finished_shards,
    prepare_output,
    read_json,
    read_table,
    read_truth,
    record_stage,
    scan_parquet,
    with_truth,
    write_json,
)
from pipelines.score_tasks import column, embed_shard, load_teachers, score_shard, scored_embeddings

SAMPLE_SEEDS = {"dn": 1, "bank": 2, "mixture": 3, "train": 4, "recall": 5}  # offsets of the config seed: independent samples
TRAIN_SIZE = 100_000  # embeddings an approximate index is trained on
RECALL_QUERIES = 500  # queries its recall against exact is measured on
PART_ROWS = 1 << 18  # rows of a partial index: bounds what the driver holds while adding
BLOCK_ROWS = 8192  # mixture-sample rows whose posterior against the bank is computed at once


# ---------------------------------------------------------------- the driver
def run_score(config: Config) -> dict:
    cfg = config.score
    out = config.score_dir()
    started = time.time()
    shards = finished_shards(config)
    teacher = teacher_spec(config)
    load_teachers(teacher)  # a teacher that cannot be loaded fails here, before any work
    prepare_output(out, "score", cfg.overwrite, {"teacher": teacher, "shards": [os.path.basename(s) for s in shards],
                                                 "params": result_params(cfg, config.seed)})
    save_config(config, join(out, "_config.yaml"))
    names = [os.path.basename(s).removesuffix(".tar") for s in shards]
    embed_paths = [join(out, "_embed", n + ".parquet") for n in names]
    score_paths = [join(out, n + ".parquet") for n in names]
    print(f"score: {len(shards)} shards, teacher {teacher['model']} x {len(teacher['checkpoints'])} checkpoint(s), "
          f"{sum(exists(p) for p in score_paths)} already scored")
    wall = {"start": time.time() - started}  # wall seconds of each phase: where the time goes
    with dask_client(cfg.scheduler, cfg.processes, gpu=teacher["device"] == "cuda") as client:
        wall["cluster"] = time.time() - started - sum(wall.values())
        todo = [(s, p) for s, p in zip(shards, embed_paths) if not exists(p)]
        embedded, failed = run_tasks(client, "embed", [(embed_shard, s, p, teacher, cfg.batch_size, cfg.threads,
                                                        decode_workers(cfg, teacher["device"])) for s, p in todo])
        if failed:
            return incomplete(failed)
        wall["embed"] = time.time() - started - sum(wall.values())
        state = global_state(embed_paths, teacher, cfg, config.seed)
        search = neighbour_index(embed_paths, out, state, cfg, config.seed)
        wall["globals"] = time.time() - started - sum(wall.values())
        todo = [(e, p) for e, p in zip(embed_paths, score_paths) if not exists(p)]
        shared = client.scatter(state, broadcast=True) if todo else None  # the bank goes to each worker once
        scored, failed = run_tasks(client, "score", [(score_shard, e, p, shared, search, cfg.threads)
                                                     for e, p in todo])
        if failed:
            return incomplete(failed)
        wall["score"] = time.time() - started - sum(wall.values())
    wall["summary"] = time.time() - started - sum(wall.values())
    summary = summarize(config, score_paths, state, search, teacher, wall,
                        {"embed": sum(r["seconds"] for r in embedded), "score": sum(r["seconds"] for r in scored)})
    write_json(join(out, "_summary.json"), summary)
    record_stage(config, "score", {"output": out, "teacher": teacher, "counts": summary["counts"]})
    print_summary(summary)
    return summary


def teacher_spec(config: Config) -> dict:
    """Model name, checkpoints (globs expanded, sorted) with their digests, device: the teacher's identity."""
    from train.models import pick_device

    cfg = config.score
    checkpoints, rule, epochs = ((expand_globs(cfg.checkpoints, "score.checkpoints"), "given", None) if cfg.checkpoints
                                 else own_teacher(config))
    for path in checkpoints:
        if looks_like_path(path) and not exists(path):
            hint = " (train the teacher first: the train stage writes it)" if not cfg.checkpoints else ""
            raise ConfigError(f"score: teacher checkpoint {path} not found{hint}")
    return {"model": cfg.model or config.train.model, "checkpoints": checkpoints, "loss_rule": rule, "epochs": epochs,
            **({"fold_seed": config.seed} if rule == "held_out" else {}),
            "digests": [file_digest(c) if looks_like_path(c) else c for c in checkpoints],
            "sentence_teacher": cfg.sentence_teacher, "device": pick_device(cfg.device).type,
            "bf16": cfg.precision == "bf16" or (cfg.precision == "auto" and pick_device(cfg.device).type == "cuda")}


def own_teacher(config: Config) -> tuple[list[str], str, list[int] | None]:
    """The train stage's teacher: best.pt first (it gives the embeddings), then the epoch checkpoints that
    `score.teacher_epochs` may average the loss over (docs/METHODS.md section 3); the rule; each one's epoch."""
    folder = join(config.run_dir(), "checkpoints")
    best = join(folder, "best.pt")
    if config.train.folds > 1:  # held-out teachers (the train stage's folds): each pair's loss from the one that never saw it
        return [best] + [join(f"{config.run_dir()}_fold{k}", "checkpoints", "best.pt") for k in range(config.train.folds)], \
            "held_out", None
    rule = config.score.teacher_epochs
    if rule == "best":
        return [best], rule, None
    kept = {int(m.group(1)): p for p in glob_any(join(folder, "epoch_*.pt")) if (m := re.search(r"epoch_(\d+)\.pt$", p))}
    best_epoch = (read_json(join(config.run_dir(), "_summary.json"), {}) or {}).get("best_epoch")
    if not kept or not best_epoch or best_epoch not in kept:
        print(f"score: the teacher run {config.run_dir()} kept no epoch checkpoints or recorded no best epoch; "
              f"scoring with best.pt alone (score.teacher_epochs={rule} needs train.epoch_checkpoints)")
        return [best], "best", None
    epochs = [best_epoch] + [e for e in sorted(kept) if e <= (max(kept) if rule == "all" else best_epoch) and e != best_epoch]
    return [best] + [kept[e] for e in epochs[1:]], rule, epochs


def looks_like_path(checkpoint: str) -> bool:
    return "/" in checkpoint or checkpoint.endswith((".pt", ".bin", ".safetensors"))


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:  # a local checkpoint or one in the object store
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def decode_workers(cfg, device: str) -> int:
    """score.decode_workers, or from this machine's cores: on GPU the cores per GPU less one (for the worker
    feeding it); on CPU the teacher's torch threads already fill cores, so only the cores they leave idle."""
    if cfg.decode_workers is not None:
        return cfg.decode_workers
    cores = os.cpu_count() or 1
    if device == "cuda":
        import torch

        return max(1, cores // max(1, torch.cuda.device_count()) - 1)
    return max(0, cores - cfg.processes * cfg.threads) // cfg.processes


def result_params(cfg, seed: int) -> dict:
    """What the bytes of scores/ depend on besides the teacher and the shards (not workers or paths)."""
    keys = ("batch_size", "dn_lambda", "dn_samples", "bank_size", "mixture_samples", "neighbours", "neighbour_search",
            "exact_limit", "faiss_index", "nprobe", "threads")
    return {"seed": seed, **{k: getattr(cfg, k) for k in keys}}


def run_tasks(client, name: str, tasks: list[tuple]) -> tuple[list[dict], list[str]]:
    """One Dask task per shard, progress as they complete; a failed shard is reported, the rest go on."""
    futures = [client.submit(fn, *args, pure=False, key=f"{name}-{os.path.basename(args[1])}") for fn, *args in tasks]
    results, failed = [], []
    for future in tqdm(as_completed(futures), total=len(futures), unit="shard", desc=name, dynamic_ncols=True):
        try:
            results.append(future.result())
        except Exception as err:  # keep going: the summary names the shard and the run exits non-zero
            failed.append(f"{future.key}: {type(err).__name__}: {err}")
    return results, failed


def incomplete(failed: list[str]) -> dict:
    print("score: these shard tasks failed (the others are kept):\n  " + "\n  ".join(sorted(failed)))
    return {"incomplete_shards": sorted(failed)}


# ---------------------------------------------------------------- globals, on the driver
def global_state(embed_paths: list[str], teacher: dict, cfg, seed: int) -> dict:
    """DN means, the reference bank and the mixture, each from its own seeded sample of scored pairs."""
    sizes = {"dn": cfg.dn_samples, "bank": cfg.bank_size, "mixture": cfg.mixture_samples}
    ranked = {name: (np.zeros(0, np.uint64), []) for name in sizes}
    n_scored = 0
    for path in embed_paths:  # the n smallest hash ranks, kept as we go: memory bounded by the sample sizes
        table = read_table(path, ["key", "status"])
        keys = [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "scored"]
        n_scored += len(keys)
        for name, size in sizes.items():
            ranks, names = ranked[name]
            ranks, names = np.concatenate([ranks, key_ranks(keys, seed + SAMPLE_SEEDS[name])]), names + keys
            keep = np.argsort(ranks, kind="stable")[:size]
            ranked[name] = (ranks[keep], [names[i] for i in keep])
    if n_scored < 2:
        raise ConfigError(f"score: {n_scored} pair(s) could be scored; a posterior needs at least 2")
    chosen = {name: set(ranked[name][1]) for name in sizes}
    n_checkpoints = len(teacher["checkpoints"])
    wanted = ["key", "status"] + [f"{side}_emb_{j}" for j in range(n_checkpoints) for side in ("image", "text")]
    parts = {name: [] for name in sizes}
    for path in embed_paths:
        table = read_table(path, wanted)
        table = table.filter(pc.equal(table["status"], "scored"))
        keys = table["key"].to_pylist()
        for name in sizes:
            rows = [i for i, k in enumerate(keys) if k in chosen[name]]
            if rows:
                parts[name].append(table.take(rows))
    samples = {name: pa.concat_tables(p).sort_by("key") for name, p in parts.items()}
    bank_keys = samples["bank"]["key"].to_pylist()
    checkpoints = []
    losses = []
    scales = load_teachers(teacher)["scales"]
    for j, scale in enumerate(scales):
        mu_v, mu_t = dn_means(column(samples["dn"], f"image_emb_{j}"), column(samples["dn"], f"text_emb_{j}"))
        bank_v = dn_center(column(samples["bank"], f"image_emb_{j}"), mu_v, cfg.dn_lambda)
        bank_t = dn_center(column(samples["bank"], f"text_emb_{j}"), mu_t, cfg.dn_lambda)
        mix = samples["mixture"]
        v = dn_center(column(mix, f"image_emb_{j}"), mu_v, cfg.dn_lambda)
        t = dn_center(column(mix, f"text_emb_{j}"), mu_t, cfg.dn_lambda)
        mix_keys, bank_ids = np.asarray(mix["key"].to_pylist()), np.asarray(bank_keys)
        losses.append(np.concatenate([  # by blocks of rows: each (rows, bank) matrix stays small; the same values
            pair_loss(*pair_posterior(v[i:i + BLOCK_ROWS], t[i:i + BLOCK_ROWS], bank_v, bank_t, scale,
                                      mix_keys[i:i + BLOCK_ROWS, None] == bank_ids[None, :]))
            for i in range(0, len(v), BLOCK_ROWS)]))
        checkpoints.append({"scale": scale, "mu_v": mu_v, "mu_t": mu_t, "bank_v": bank_v, "bank_t": bank_t})
    try:
        averaged, noise_by_epoch = loss_span(teacher, losses, seed)
        mixture = fit_mixture(pair_losses(teacher, averaged, losses, mix["key"].to_pylist()), seed)
    except ValueError as err:
        raise ConfigError(f"score: {err}; score more data or set score.mixture_samples higher") from None
    # The temperature indicator, from the first teacher: raw cosine of the DN sample's pairs vs the bank.
    dn = samples["dn"]
    v0, t0 = normalise(column(dn, "image_emb_0")), normalise(column(dn, "text_emb_0"))
    bank_t0 = normalise(column(samples["bank"], "text_emb_0"))
    not_self = np.asarray(dn["key"].to_pylist())[:, None] != np.asarray(bank_keys)[None, :]
    indicator = temperature_noise_indicator(scales[0], cosine_score(v0, t0), (v0 @ bank_t0.T)[not_self], len(bank_keys) + 1)
    return {"checkpoints": checkpoints, "averaged": averaged, "noise_by_epoch": noise_by_epoch,
            "teacher": {k: teacher[k] for k in ("loss_rule", "fold_seed") if k in teacher},  # how pair_losses picks
            "bank_keys": bank_keys, "mixture": mixture, "lambda": cfg.dn_lambda,
            "n_scored": n_scored, "temperature_indicator": indicator, "k": cfg.neighbours,
            "sample_sizes": {name: len(samples[name]) for name in sizes}}


def loss_span(teacher: dict, losses: list[np.ndarray], seed: int) -> tuple[list[int], dict | None]:
    """Which checkpoints' losses are averaged: all, but for the early rule the epochs up to the end of early
    learning (curate.scores.early_learning_end), found on the mixture sample; with the noise found at each epoch.
    The held-out rule averages none: each pair takes one fold teacher's loss (pair_losses)."""
    if teacher["loss_rule"] == "held_out":
        return [], None
    if teacher["loss_rule"] != "early":
        return list(range(len(losses))), None
    epochs = teacher["epochs"]
    noise = [estimated_noise(loss, seed) for loss in losses]
    end = early_learning_end(epochs, noise)
    return [j for j, e in enumerate(epochs) if e <= end], {e: round(n, 4) for e, n in sorted(zip(epochs, noise))}


def neighbour_index(embed_paths: list[str], out: str, state: dict, cfg, seed: int) -> dict:
    """faiss indexes of the first teacher's image and text embeddings, built here, searched by every score task.

    exact: a flat index (brute force in BLAS); faiss: `faiss_index`, by default IVF + SQ8 (one byte
    per dimension, for datasets where float32 vectors would not fit). Both are built shard by shard
    (build_shard_index); the faiss one also reports its recall against exact on a seeded sample of queries.
    """
    if cfg.neighbours == 0:
        return {"method": "none"}
    method = cfg.neighbour_search
    if method == "auto":
        method = "exact" if state["n_scored"] <= cfg.exact_limit else "faiss"
    factory = "Flat" if method == "exact" else cfg.faiss_index
    factory = nn.auto_factory(state["n_scored"]) if factory == "auto" else factory
    search = {"method": method, "nprobe": cfg.nprobe, "factory": factory}
    for side in ("image", "text"):
        search[side] = join(out, "_index", f"{side}.faiss")
        recall = build_shard_index(embed_paths, partial(scored_embeddings, name=f"{side}_emb_0"), search[side], factory,
                                   seed, k=cfg.neighbours, nprobe=cfg.nprobe)
        if recall is not None:
            search[f"{side}_recall"] = recall
        search[f"{side}_built"] = time.time_ns()  # workers keep an index read in an earlier run: this tells them apart
    return search


def build_shard_index(shards: list[str], read, path: str, factory: str, seed: int, k: int = 16,
                      nprobe: int = 32) -> dict | None:
    """An index of every shard's embeddings (read(shard) -> (float (n, d), int64 ids)), written atomically to path,
    never holding all embeddings at once.

    Taken from autofaiss's build under a memory budget: train the empty index on a bounded sample, add the
    embeddings part by part into partial indexes on disk, and merge their inverted lists into one file
    (as faiss.contrib.ondisk.merge_ondisk) that the index maps instead of holding. Not taken: its index-factory
    search (the factory is given) and its random training sample (here the TRAIN_SIZE smallest seeded key
    ranks, curate.scores.key_ranks, so it does not depend on shard order). The driver holds the sample and one
    part (PART_ROWS rows) at most; each score worker maps the lists, so the page cache holds them once.
    On an object store there are no files to map: the index is built in memory and stored whole.
    "Flat" (the exact path, up to exact_limit pairs) needs no training: shard by shard it holds the same
    vectors under the same ids in the same order as a one-shot build, so the same bytes.

    Resumable: the trained empty index and each finished part are written atomically beside path; a build
    killed midway restarts from them, and path itself only ever appears complete. Returns, for a trained
    index, its recall@k against exact on RECALL_QUERIES seeded queries, else None.
    """
    if factory == "Flat":
        index = None
        for x, ids in map(read, shards):
            if index is None and len(ids):
                index = nn.train_index(x[:0], factory, seed)
            if len(ids):
                nn.add(index, x, ids)
        with atomic_open(path) as f:
            nn.write_index(index, f)
        return None
    stem = path.removesuffix(".faiss")
    samples = sample_shards(shards, read, {"train": (TRAIN_SIZE, seed + SAMPLE_SEEDS["train"]),
                                           "recall": (RECALL_QUERIES, seed + SAMPLE_SEEDS["recall"])})
    trained = stem + ".trained.faiss"
    if not exists(trained):
        with atomic_open(trained) as f:
            nn.write_index(nn.train_index(samples["train"][0], factory, seed), f)
    del samples["train"]
    if is_local(path):
        index = ondisk_index(shards, read, fsspec.core.url_to_fs(stem)[1], trained)  # the lists' file by its absolute path
    else:
        index = read_index(trained)
        for shard in shards:
            nn.add(index, *read(shard))
    with atomic_open(path) as f:
        nn.write_index(index, f)
    queries, exact = samples["recall"], None
    for shard in shards:  # the queries' exact neighbours, a shard at a time
        x, ids = read(shard)
        found = nn.exact_topk(queries[0], x, k, query_ids=queries[1], base_ids=ids)
        exact = found if exact is None else nn.merge_topk(*exact, *found, k)
    found = nn.index_topk(index, queries[0], k, query_ids=queries[1], nprobe=nprobe)
    return {"k": k, "queries": len(queries[1]), "recall": round(nn.recall_at_k(found[1], exact[1]), 4)}


def ondisk_index(shards: list[str], read, stem: str, trained: str):
    """The trained index holding every shard, its inverted lists merged into stem.ivfdata from partial indexes
    of about PART_ROWS rows each (stem.parts/, kept until the merge is done; a part on disk is not rebuilt)."""
    per_part = max(1, PART_ROWS // max(1, len(read(shards[0])[1]))) if shards else 1
    parts = []
    for i in range(0, len(shards), per_part):
        parts.append(f"{stem}.parts/{i // per_part:05d}.faiss")
        if exists(parts[-1]):
            continue
        index = read_index(trained)
        for shard in shards[i:i + per_part]:
            nn.add(index, *read(shard))
        os.makedirs(os.path.dirname(parts[-1]), exist_ok=True)
        with atomic_open(parts[-1]) as f:
            nn.write_index(index, f)
        del index
    index = read_index(trained)
    if os.path.exists(stem + ".ivfdata"):
        os.remove(stem + ".ivfdata")  # a merge killed midway: lists are rewritten whole
    nn.merge_ondisk(index, parts, stem + ".ivfdata")
    shutil.rmtree(stem + ".parts", ignore_errors=True)
    return index


def read_index(path: str):
    with fsspec.open(path, "rb") as f:
        return nn.deserialize_index(f.read())


def sample_shards(shards: list[str], read, sizes: dict) -> dict:
    """For each name, (size, seed): the rows of the `size` smallest seeded key ranks over all shards, as float32
    (n, d) and int64 ids sorted by id; memory bounded by the sample sizes and one shard."""
    kept = {name: (np.zeros(0, np.uint64), None, np.zeros(0, np.int64)) for name in sizes}
    for shard in shards:
        x, ids = read(shard)
        keys = [str(i) for i in ids]
        for name, (size, seed) in sizes.items():
            ranks, rows, row_ids = kept[name]
            ranks = np.concatenate([ranks, key_ranks(keys, seed)])
            rows = x.astype(np.float32) if rows is None else np.concatenate([rows, x.astype(np.float32)])
            row_ids = np.concatenate([row_ids, ids])
            keep = np.sort(np.argsort(ranks, kind="stable")[:size])
            kept[name] = (ranks[keep], rows[keep], row_ids[keep])
    out = {}
    for name, (_, rows, row_ids) in kept.items():
        order = np.argsort(row_ids, kind="stable")
        out[name] = (rows[order], row_ids[order])
    return out


# ---------------------------------------------------------------- summary
def summarize(config: Config, score_paths: list[str], state: dict, search: dict, teacher: dict, wall: dict,
              task_seconds: dict) -> dict:
    names = ["key", "row", "status", "error", "cosine", "dn_score", "loss", "clean_prob"]
    frame = pl.concat([scan_parquet(p, names + (["loss_by_checkpoint"] if len(teacher["checkpoints"]) > 1 else []))
                       for p in score_paths])
    counts = frame.select(samples=pl.len(), scored=(pl.col("status") == "scored").sum()).collect(engine="streaming")
    samples, scored = counts["samples"].item(), counts["scored"].item()
    clean_prob = (frame.filter(pl.col("status") == "scored").select("clean_prob")
                  .collect(engine="streaming")["clean_prob"].to_numpy())
    errors = (frame.filter(pl.col("error") != "").group_by("error").len()
              .collect(engine="streaming").sort("error"))
    reasons = dict(errors.iter_rows())
    ck0 = state["checkpoints"][0]
    total = sum(wall.values())
    pairs_per_s = samples / total if total else None
    summary = {
        "teacher": {"model": teacher["model"], "checkpoints": teacher["checkpoints"], "loss_rule": teacher["loss_rule"],
                    "epochs": teacher["epochs"], "averaged": state["averaged"],  # which checkpoints' loss is averaged
                    "noise_by_epoch": state["noise_by_epoch"], "digests": teacher["digests"],
                    "logit_scale": [c["scale"] for c in state["checkpoints"]], "tau_s": 1.0 / ck0["scale"],
                    "sentence_teacher": teacher["sentence_teacher"]},
        "counts": {"samples": samples, "scored": scored, "failed": samples - scored,
                   "failed_by_reason": reasons},
        "dn": {"lambda": state["lambda"], "mu_v": ck0["mu_v"].tolist(), "mu_t": ck0["mu_t"].tolist()},
        "bank": {"size": len(state["bank_keys"]), "samples": state["sample_sizes"]},
        "mixture": state["mixture"],
        "noise": {"estimated_rate": float(1 - clean_prob.mean()) if len(clean_prob) else None,
                  "noisy_component_weight": state["mixture"]["weights"][1],
                  "temperature_indicator": state["temperature_indicator"]},
        "neighbours": {"k": state["k"], "method": search["method"],
                       **{f"{side}_recall": search[f"{side}_recall"] for side in ("image", "text") if f"{side}_recall" in search}},
        "seconds": {"total": round(total, 2), "wall": {k: round(v, 2) for k, v in wall.items()},
                    "tasks": {k: round(v, 2) for k, v in task_seconds.items()}},
        "pairs_per_second": round(pairs_per_s, 1) if pairs_per_s else None,
        "shards": [os.path.basename(p) for p in score_paths],
        "detection": detection(config, frame, teacher),
    }
    return summary


def detection(config: Config, frame: pl.LazyFrame, teacher: dict) -> dict | None:
    """With a labels table (`truth`): how well each score finds the pairs it calls noisy, overall and by noise kind."""
    truth = read_truth(config.truth)
    if truth is None:
        return None
    scored = frame.filter(pl.col("status") == "scored").collect(engine="streaming")
    known = with_truth(config, scored, truth).filter(pl.col("noisy").is_not_null())
    noisy = known["noisy"].to_numpy()
    if noisy.all() or not noisy.any():
        return None
    kinds = known["noise_type"].to_numpy() if "noise_type" in known.columns else None
    result = {"truth": config.truth, **detection_report(noisy, kinds, {name: known[name].to_numpy() for name in NOISY_WHEN})}
    if "loss_by_checkpoint" in known.columns:
        per = known["loss_by_checkpoint"].explode().to_numpy().reshape(len(known), -1)
        result["auroc_by_checkpoint"] = [
            {"checkpoint": c, "loss": auroc(noisy, per[:, j]),
             **({"by_kind": {kind: auroc(noisy[(kinds == kind) | ~noisy], per[(kinds == kind) | ~noisy, j])
                             for kind in result["by_kind"]}} if kinds is not None else {})}
            for j, c in enumerate(teacher["checkpoints"])]
    return result


def print_summary(summary: dict) -> None:
    c, n, t = summary["counts"], summary["noise"], summary["teacher"]
    print(f"\nscore summary: {c['samples']} samples = {c['scored']} scored + {c['failed']} failed")
    for reason, count in c["failed_by_reason"].items():
        print(f"  {count:>8}  {reason}")
    loss = f"loss averaged over {len(t['averaged'])} checkpoint(s)"
    if t["loss_rule"] == "held_out":
        loss = f"each pair's loss from the one of {len(t['checkpoints']) - 1} fold teachers that never saw it"
    elif t["epochs"]:
        loss = "loss averaged over epochs " + ", ".join(str(e) for e in sorted(t["epochs"][j] for j in t["averaged"]))
    print(f"  teacher {t['model']}: {loss} ({t['loss_rule']}); embeddings, cosine and DN from "
          f"{t['checkpoints'][0]}, logit scale {t['logit_scale'][0]:.2f} (tau_s {t['tau_s']:.4f})")
    if t["noise_by_epoch"]:
        print("  noise found by epoch (the early rule averages up to its peak): "
              + ", ".join(f"{e}: {n:.3f}" for e, n in t["noise_by_epoch"].items()))
    print(f"  estimated noise rate {n['estimated_rate']:.3f} (mixture), temperature indicator "
          f"{n['temperature_indicator']:.3g} (relative)")
    if summary["detection"]:
        print_detection(summary["detection"])
    phases = ", ".join(f"{k} {v}" for k, v in summary["seconds"]["wall"].items())
    print(f"  {summary['seconds']['total']} s ({phases}), {summary['pairs_per_second']} pairs/s, "
          f"neighbours {summary['neighbours']['method']}")


def detection_rows(d: dict) -> list[tuple]:
    """(noise, pairs, share flagged or None, AUROC by score) for all noisy pairs, then for each kind."""
    return [("all noisy", d["noisy"], None, d["auroc"])] + [(k, v["pairs"], v["flagged"], v["auroc"])
                                                          for k, v in d.get("by_kind", {}).items()]


def print_detection(d: dict) -> None:
    rate = d["noise_rate"]
    print(f"  detection vs {d['truth']}: noise rate {rate['estimated']:.3f} estimated, {rate['labelled']:.3f} labelled; "
          f"{d['clean_flagged']:.1%} of clean pairs flagged (clean_prob < 0.5)")
    print(f"  {'AUROC':<20} {'pairs':>6} {'flagged':>7} " + " ".join(f"{name:>10}" for name in NOISY_WHEN))
    for name, pairs, flagged, a in detection_rows(d):
        share = f"{flagged:.1%}" if flagged is not None else ""
        print(f"  {name:<20} {pairs:>6} {share:>7} " + " ".join(f"{a[k]:>10.3f}" for k in NOISY_WHEN))
