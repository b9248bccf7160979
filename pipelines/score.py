"""The score stage: one pass of a teacher over the shards, then per-pair noise scores and neighbours.

    shards/NNNNN.tar ─▶ embed (Dask, one task per shard; the teacher loaded once per worker) ─▶ scores/_embed/NNNNN.parquet
    seeded samples of the embeddings ─▶ DN means, reference bank, mixture fit (driver; memory bounded by the samples)
    _embed/NNNNN.parquet + those globals ─▶ score (Dask, one task per shard) ─▶ scores/NNNNN.parquet ─▶ _summary.json

Every file is written under a temporary name and renamed, rows are sorted by key and every random
choice is a seeded hash of the key, so a re-run, a resumed run and an uninterrupted one give the same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from dask.distributed import as_completed
from tqdm import tqdm

from curate import neighbours as nn
from curate.dn import dn_center, dn_means, normalise
from curate.scores import (
    auroc,
    clean_probability,
    cosine_score,
    fit_mixture,
    key_ranks,
    pair_loss,
    pair_posterior,
    temperature_noise_indicator,
)
from curate.teacher import BadSample, embed, embed_captions, fast_path, load_text_teacher, logit_scale, prepare, stack_images
from pipelines.config import Config, ConfigError, join, save_config
from pipelines.distributor import dask_client
from pipelines.manifest import read_json, record_stage, write_json

SAMPLE_SEEDS = {"dn": 1, "bank": 2, "mixture": 3}  # offsets of the config seed: three independent samples


# ---------------------------------------------------------------- the driver
def run_score(config: Config) -> dict:
    cfg = config.score
    out = config.score_dir()
    started = time.time()
    shards = score_shards(config)
    teacher = teacher_spec(config)
    load_teachers(teacher)  # a teacher that cannot be loaded fails here, before any work
    fs, out_path = fsspec.core.url_to_fs(out)
    prepare_output(fs, out_path, out, {"teacher": teacher, "shards": [os.path.basename(s) for s in shards],
                                       "params": result_params(cfg, config.seed)}, cfg.overwrite)
    save_config(config, join(out, "_config.yaml"))
    names = [os.path.basename(s).removesuffix(".tar") for s in shards]
    embed_paths = [join(out, "_embed", n + ".parquet") for n in names]
    score_paths = [join(out, n + ".parquet") for n in names]
    print(f"score: {len(shards)} shards, teacher {teacher['model']} x {len(teacher['checkpoints'])} checkpoint(s), "
          f"{sum(fs.exists(p) for p in score_paths)} already scored")
    wall = {"start": time.time() - started}  # wall seconds of each phase: where the time goes
    with dask_client(cfg.scheduler, cfg.processes, gpu=teacher["device"] == "cuda") as client:
        wall["cluster"] = time.time() - started - sum(wall.values())
        todo = [(s, p) for s, p in zip(shards, embed_paths) if not fs.exists(p)]
        embedded, failed = run_tasks(client, "embed", [(embed_shard, s, p, teacher, cfg.batch_size, cfg.threads)
                                                       for s, p in todo])
        if failed:
            return incomplete(failed)
        wall["embed"] = time.time() - started - sum(wall.values())
        state = global_state(embed_paths, teacher, cfg, config.seed)
        search = neighbour_index(embed_paths, out, state, cfg, config.seed)
        wall["globals"] = time.time() - started - sum(wall.values())
        todo = [(e, p) for e, p in zip(embed_paths, score_paths) if not fs.exists(p)]
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


def score_shards(config: Config) -> list[str]:
    done = read_json(join(config.shard_dir(), "_summary.json"))
    if not done or not done["shards"]:
        raise ConfigError(f"{config.shard_dir()} holds no complete shards; run the shard stage first")
    return [join(config.shard_dir(), name) for name in done["shards"]]


def teacher_spec(config: Config) -> dict:
    """Model name, checkpoints (globs expanded, sorted) with their digests, device: the teacher's identity."""
    from train.models import pick_device

    cfg = config.score
    patterns = cfg.checkpoints or [join(config.run_dir(), "checkpoints", "best.pt")]
    checkpoints = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise ConfigError(f"score.checkpoints: nothing matches {pattern}")
        checkpoints += [c for c in found if c not in checkpoints]
    for path in checkpoints:
        if looks_like_path(path) and not os.path.exists(path):
            hint = " (train the teacher first: the train stage writes it)" if not cfg.checkpoints else ""
            raise ConfigError(f"score: teacher checkpoint {path} not found{hint}")
    return {"model": cfg.model or config.train.model, "checkpoints": checkpoints,
            "digests": [file_digest(c) if looks_like_path(c) else c for c in checkpoints],
            "text_teacher": cfg.text_teacher, "device": pick_device(cfg.device).type,
            "bf16": cfg.precision == "bf16" or (cfg.precision == "auto" and pick_device(cfg.device).type == "cuda")}


def looks_like_path(checkpoint: str) -> bool:
    return "/" in checkpoint or checkpoint.endswith((".pt", ".bin", ".safetensors"))


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def result_params(cfg, seed: int) -> dict:
    """What the bytes of scores/ depend on besides the teacher and the shards (not workers or paths)."""
    keys = ("batch_size", "dn_lambda", "dn_samples", "bank_size", "mixture_samples", "neighbours", "neighbour_search",
            "exact_limit", "faiss_index", "nprobe", "threads")
    return {"seed": seed, **{k: getattr(cfg, k) for k in keys}}


def prepare_output(fs, out_path: str, out: str, identity: dict, overwrite: bool) -> None:
    """Resume only onto scores of the same teacher, shards and parameters; start afresh when asked."""
    if overwrite and fs.exists(out_path):
        fs.rm(out_path, recursive=True)
    previous = read_json(join(out, "_state.json"))
    if previous and previous != identity:
        changed = [k for k in identity if previous.get(k) != identity[k]]
        raise ConfigError(f"{out} holds scores of another {' and '.join(changed)}; set score.overwrite=true to "
                          "discard them, or choose another score.output")
    fs.makedirs(join(out_path, "_embed"), exist_ok=True)
    write_json(join(out, "_state.json"), identity)


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


# ---------------------------------------------------------------- teacher, on each worker
_TEACHERS: dict = {}


def load_teachers(spec: dict) -> dict:
    """The teacher models, loaded once per process (worker) and kept."""
    key = (spec["model"], tuple(spec["checkpoints"]), spec["text_teacher"], spec["device"])
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
        if spec["text_teacher"]:
            try:
                text = load_text_teacher(spec["text_teacher"], spec["device"])
            except Exception as err:
                raise ConfigError(f"score: cannot load the text teacher {spec['text_teacher']}: {err}") from None
        _TEACHERS.clear()  # one teacher per worker at a time
        _TEACHERS[key] = {"models": models, "scales": scales, "preprocess": preprocess, "tokenizer": tokenizer,
                          "fast": fast_path(models[0]),
                          "text": text, "device": device}
    return _TEACHERS[key]


def read_shard(url: str) -> list[dict]:
    """A shard's samples sorted by key (img2dataset writes them in download order)."""
    samples = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.warn_and_continue)))
    return sorted(samples, key=lambda s: s["__key__"])


def embed_shard(url: str, out: str, spec: dict, batch_size: int, threads: int) -> dict:
    """Teacher embeddings of one shard (every checkpoint), failures kept as rows with their reason."""
    started = time.time()
    torch.set_num_threads(threads)
    teacher = load_teachers(spec)
    samples = read_shard(url)
    keys = [s["__key__"] for s in samples]
    rows = [sample_row(s) for s in samples]
    errors: list[str | None] = [None] * len(samples)
    good: list[int] = []
    captions: list[str] = []
    dims = [m.visual.output_dim for m in teacher["models"]]  # the schema of a shard with no good sample
    embeddings = [([], []) for _ in teacher["models"]]

    def decode(batch: list[int]):  # runs in a thread, one batch ahead of the forward
        done = []
        for i in batch:
            try:
                done.append((i, *prepare(samples[i], teacher["preprocess"], teacher["fast"])))
            except BadSample as err:
                errors[i] = str(err)
        if not done:
            return None
        captions = [d[2] for d in done]
        images = stack_images([d[1] for d in done], teacher["fast"])
        return [d[0] for d in done], images, teacher["tokenizer"](captions), captions

    batches = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
    with ThreadPoolExecutor(1) as pool:  # decode the next batch while this one runs (PIL releases the GIL)
        pending = pool.submit(decode, batches[0]) if batches else None
        for b in range(len(batches)):
            done = pending.result()
            pending = pool.submit(decode, batches[b + 1]) if b + 1 < len(batches) else None
            if done is None:
                continue
            good += done[0]
            captions += done[3]
            for model, (image_out, text_out) in zip(teacher["models"], embeddings):
                v, t = embed(model, done[1], done[2], teacher["device"], spec["bf16"])
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
        columns["text_teacher_emb"] = scatter(sentence, good, len(samples), teacher["text"].get_sentence_embedding_dimension())
    write_table(pa.table(columns), out)
    return {"shard": os.path.basename(url), "samples": len(samples), "scored": len(good),
            "failed": len(samples) - len(good), "seconds": time.time() - started}


def sample_row(sample: dict) -> int | None:
    try:
        return json.loads(sample["json"]).get("row")
    except (KeyError, ValueError):
        return None


def scatter(parts: list[np.ndarray], good: list[int], n: int, dim: int) -> pa.Array:
    """float16 fixed-size lists, one per sample, null where the sample failed."""
    values = np.zeros((n, dim), dtype=np.float16)
    if parts:
        values[good] = np.concatenate(parts).astype(np.float16)
    mask = np.ones(n, dtype=bool)
    mask[good] = False
    flat = pa.array(values.ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(mask))


def write_table(table: pa.Table, path: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p + ".tmp", "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(p + ".tmp", p)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    with fsspec.open(path, "rb") as f:
        return pq.read_table(f, columns=columns, use_threads=False)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size-list column as a float64 (n, d) array."""
    col = table.column(name).combine_chunks()
    size = col.type.list_size
    values = col.values.slice(col.offset * size, len(col) * size)  # null rows keep their (zero) slots
    return values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), size)


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
        self_in_bank = np.asarray(mix["key"].to_pylist())[:, None] == np.asarray(bank_keys)[None, :]
        losses.append(pair_loss(*pair_posterior(v, t, bank_v, bank_t, scale, self_in_bank)))
        checkpoints.append({"scale": scale, "mu_v": mu_v, "mu_t": mu_t, "bank_v": bank_v, "bank_t": bank_t})
    try:
        mixture = fit_mixture(np.mean(losses, axis=0), seed)
    except ValueError as err:
        raise ConfigError(f"score: {err}; score more data or set score.mixture_samples higher") from None
    # The temperature indicator, from the first teacher: raw cosine of the DN sample's pairs vs the bank.
    dn = samples["dn"]
    v0, t0 = normalise(column(dn, "image_emb_0")), normalise(column(dn, "text_emb_0"))
    bank_t0 = normalise(column(samples["bank"], "text_emb_0"))
    not_self = np.asarray(dn["key"].to_pylist())[:, None] != np.asarray(bank_keys)[None, :]
    indicator = temperature_noise_indicator(scales[0], cosine_score(v0, t0), (v0 @ bank_t0.T)[not_self], len(bank_keys) + 1)
    return {"checkpoints": checkpoints, "bank_keys": bank_keys, "mixture": mixture, "lambda": cfg.dn_lambda,
            "n_scored": n_scored, "temperature_indicator": indicator, "k": cfg.neighbours,
            "sample_sizes": {name: len(samples[name]) for name in sizes}}


def neighbour_index(embed_paths: list[str], out: str, state: dict, cfg, seed: int) -> dict:
    """faiss indexes of the first teacher's image and text embeddings, built here, searched by every score task.

    exact: a flat index (brute force in BLAS); faiss: `faiss_index`, by default IVF + SQ8 (one byte
    per dimension, for datasets where float32 vectors would not fit).
    """
    if cfg.neighbours == 0:
        return {"method": "none"}
    method = cfg.neighbour_search
    if method == "auto":
        method = "exact" if state["n_scored"] <= cfg.exact_limit else "faiss"
    search = {"method": method, "nprobe": cfg.nprobe, "factory": "Flat" if method == "exact" else cfg.faiss_index}
    for side in ("image", "text"):
        embs, ids = zip(*(scored_embeddings(path, f"{side}_emb_0") for path in embed_paths))
        index = nn.build_index(np.concatenate(embs).astype(np.float32), np.concatenate(ids), factory=search["factory"],
                               seed=seed)
        search[side] = join(out, "_index", f"{side}.faiss")
        nn.save_index(index, search[side])
        search[f"{side}_built"] = time.time_ns()  # workers keep an index read in an earlier run: this tells them apart
    return search


def scored_embeddings(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The normalised embeddings of a file's scored rows and their keys as integer ids."""
    table = read_table(path, ["key", "status", name])
    table = table.filter(pc.equal(table["status"], "scored"))
    return normalise(column(table, name)), key_ids(table["key"].to_pylist())


def key_ids(keys: list[str]) -> np.ndarray:
    """img2dataset keys are zero-padded shard and sample numbers, so each is also an int64 id."""
    try:
        return np.asarray([int(k) for k in keys], dtype=np.int64)
    except ValueError:
        raise ValueError(f"sample keys must be numeric (img2dataset's), got e.g. {keys[:3]}") from None


# ---------------------------------------------------------------- scores, on each worker
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
    loss = np.mean(losses, axis=0)
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
    if "text_teacher_emb" in table.column_names:
        columns["text_teacher_emb"] = table["text_teacher_emb"]
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
    write_table(pa.table(columns), out)
    return {"shard": os.path.basename(out), "seconds": time.time() - started, "scored": int(scored.sum())}


_INDEXES: dict = {}


def cached_index(path: str, built: int):
    """Each worker reads each index once, not once per task."""
    key = (path, built)
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = nn.load_index(path)
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


# ---------------------------------------------------------------- summary
def summarize(config: Config, score_paths: list[str], state: dict, search: dict, teacher: dict, wall: dict,
              task_seconds: dict) -> dict:
    names = ["key", "row", "status", "error", "cosine", "dn_score", "loss", "clean_prob"]
    tables = [read_table(p, names + (["loss_by_checkpoint"] if len(teacher["checkpoints"]) > 1 else []))
              for p in score_paths]
    table = pa.concat_tables(tables)
    status = np.asarray(table["status"].to_pylist())
    ok = status == "scored"
    clean_prob = table["clean_prob"].to_numpy(zero_copy_only=False)[ok]
    errors = [e for e in table["error"].to_pylist() if e]
    reasons = {r: errors.count(r) for r in sorted(set(errors))}
    ck0 = state["checkpoints"][0]
    total = sum(wall.values())
    pairs_per_s = len(table) / total if total else None
    summary = {
        "teacher": {"model": teacher["model"], "checkpoints": teacher["checkpoints"], "digests": teacher["digests"],
                    "logit_scale": [c["scale"] for c in state["checkpoints"]], "tau_s": 1.0 / ck0["scale"],
                    "text_teacher": teacher["text_teacher"]},
        "counts": {"samples": len(table), "scored": int(ok.sum()), "failed": int((~ok).sum()),
                   "failed_by_reason": reasons},
        "dn": {"lambda": state["lambda"], "mu_v": ck0["mu_v"].tolist(), "mu_t": ck0["mu_t"].tolist()},
        "bank": {"size": len(state["bank_keys"]), "samples": state["sample_sizes"]},
        "mixture": state["mixture"],
        "noise": {"estimated_rate": float(1 - clean_prob.mean()) if len(clean_prob) else None,
                  "noisy_component_weight": state["mixture"]["weights"][1],
                  "temperature_indicator": state["temperature_indicator"]},
        "neighbours": {"k": state["k"], "method": search["method"]},
        "seconds": {"total": round(total, 2), "wall": {k: round(v, 2) for k, v in wall.items()},
                    "tasks": {k: round(v, 2) for k, v in task_seconds.items()}},
        "pairs_per_second": round(pairs_per_s, 1) if pairs_per_s else None,
        "shards": [os.path.basename(p) for p in score_paths],
        "detection": detection(config, table, ok, teacher),
    }
    return summary


def detection(config: Config, table: pa.Table, ok: np.ndarray, teacher: dict) -> dict | None:
    """Where the demo world's truth table exists: AUROC of each score for finding the injected noise."""
    truth_path = join(config.world_dir(), "truth.parquet") if config.world is not None else None
    if not truth_path or not os.path.exists(truth_path):
        return None
    truth = pq.read_table(truth_path, columns=["row", "noisy"]).to_pydict()
    noisy_by_row = dict(zip(truth["row"], truth["noisy"]))
    rows = table["row"].to_pylist()
    keep = np.asarray([ok[i] and rows[i] in noisy_by_row for i in range(len(rows))])
    noisy = np.asarray([noisy_by_row[r] for r, k in zip(rows, keep) if k])
    if noisy.all() or not noisy.any():
        return None
    values = {name: table[name].to_numpy(zero_copy_only=False)[keep] for name in ("cosine", "dn_score", "loss", "clean_prob")}
    result = {"pairs": int(keep.sum()), "noisy": int(noisy.sum()),
              "auroc": {"clean_prob": auroc(noisy, -values["clean_prob"]), "loss": auroc(noisy, values["loss"]),
                        "cosine": auroc(noisy, -values["cosine"]), "dn_score": auroc(noisy, -values["dn_score"])}}
    if "loss_by_checkpoint" in table.column_names:
        per = np.asarray([r for r, k in zip(table["loss_by_checkpoint"].to_pylist(), keep) if k])
        result["auroc_by_checkpoint"] = [{"checkpoint": c, "loss": auroc(noisy, per[:, j])}
                                         for j, c in enumerate(teacher["checkpoints"])]
    return result


def print_summary(summary: dict) -> None:
    c, n, t = summary["counts"], summary["noise"], summary["teacher"]
    print(f"\nscore summary: {c['samples']} samples = {c['scored']} scored + {c['failed']} failed")
    for reason, count in c["failed_by_reason"].items():
        print(f"  {count:>8}  {reason}")
    print(f"  teacher {t['model']} ({len(t['checkpoints'])} checkpoint(s)), logit scale {t['logit_scale'][0]:.2f} "
          f"(tau_s {t['tau_s']:.4f})")
    print(f"  estimated noise rate {n['estimated_rate']:.3f} (mixture), temperature indicator "
          f"{n['temperature_indicator']:.3g} (relative)")
    if summary["detection"]:
        a = summary["detection"]["auroc"]
        print(f"  detection AUROC vs the world's truth: clean_prob {a['clean_prob']:.3f}, loss {a['loss']:.3f}, "
              f"cosine {a['cosine']:.3f}, DN {a['dn_score']:.3f}")
    phases = ", ".join(f"{k} {v}" for k, v in summary["seconds"]["wall"].items())
    print(f"  {summary['seconds']['total']} s ({phases}), {summary['pairs_per_second']} pairs/s, "
          f"neighbours {summary['neighbours']['method']}")
