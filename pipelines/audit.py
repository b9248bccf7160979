"""The audit stage: how noisy is this dataset, where is the noise, what would a filter keep, which pairs show it.

    scores/*.parquet + shards/*.parquet (urls, captions, failures) + scores/_summary.json
        ─▶ facts (curate.policies, numpy) + figures and page (curate.report) ─▶ audit/index.html, summary.json, *.png

Shards whose scores are missing are reported on the page and left out; nothing else stops the audit.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter

import numpy as np
import polars as pl
from PIL import Image

from curate import report
from curate.policies import decide, policy_columns
from curate.scores import auroc
from pipelines.config import Config, join
from pipelines.io import (
    atomic_write,
    exists,
    read_json,
    read_shard,
    read_truth,
    record_stage,
    scan_parquet,
    scan_scores,
    score_facts,
    score_files,
    with_truth,
    write_json,
)

THUMBNAIL = 112
SCALARS = ["key", "row", "status", "error", "cosine", "dn_score", "loss", "clean_prob"]


def run_audit(config: Config) -> dict:
    cfg = config.audit
    paths, names, missing = score_files(config)
    summary = read_json(join(config.score_dir(), "_summary.json"), {})
    truth = read_truth(config.truth)
    # the scored pairs' scalars and source, read a shard at a time; failures counted, not kept
    scored, samples, failures = scored_pairs(config, paths, truth)
    facts = {
        "title": f"Noise audit of {config.root}",
        "teacher": summary.get("teacher"),
        "noise": noise_facts(scored, summary, cfg.bootstrap, config.seed),
        "counts": count_facts(config, samples, len(scored), failures),
        "policies": policy_facts(config, list(paths.values())),
        "sources": source_facts(scored),
        "missing_scores": missing,
        "warnings": [],
    }
    known = scored.filter(pl.col("noisy").is_not_null()) if truth is not None else None
    if known is not None and known["noisy"].n_unique() == 2:  # AUROC needs both clean and noisy pairs
        facts["detection"] = detection_facts(known, cfg.threshold)
    if len(scored) == 0:
        facts["warnings"].append("no pair could be scored: every figure below is empty")
    frame = scan_scores(config)[0]
    galleries = gallery_facts(config, names, frame, scored, cfg.gallery_size, cfg.duplicate_sim)
    thumbs = thumbnails(config, {item["key"] for items in galleries.values() for item in items})
    figures = report.histograms(scored, summary.get("mixture"))
    figures["policies"] = report.policy_curves(policy_curves(scored))
    out = config.audit_dir()
    for name, data in report.figure_files(figures).items():
        atomic_write(join(out, name), data)
    atomic_write(join(out, "index.html"), report.render_page(facts, figures, galleries, thumbs))
    write_json(join(out, "summary.json"), facts)
    record_stage(config, "audit", {"output": out, "pairs": len(scored), "missing_scores": missing})
    n = facts["noise"]
    print(f"audit: {len(scored)} scored pairs, estimated noise {n['estimated_rate']:.1%} "
          f"[{n['ci_low']:.1%}, {n['ci_high']:.1%}]" + (f"; {len(missing)} shard(s) without scores" if missing else "")
          + f"\naudit: report {join(out, 'index.html')}")
    return facts


def shard_rows(config: Config, names: list[str], columns: list[str]) -> pl.LazyFrame:
    return pl.concat([scan_parquet(join(config.shard_dir(), name + ".parquet"), columns) for name in names])


def with_sources(config: Config, scores: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """Scores with each sample's url and source (the url's host, from its shard's parquet)."""
    sources = shard_rows(config, names, ["key", "url"]).with_columns(
        source=pl.col("url").str.extract(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/:?#]+)", 1))
    return (scores.lazy().join(sources, on="key", how="left", maintain_order="left")
            .with_columns(pl.col("source").fill_null("unknown")).collect(engine="streaming"))


def scored_pairs(config: Config, paths: dict[str, str], truth: pl.DataFrame | None) -> tuple[pl.DataFrame, int, dict]:
    """The scored pairs (key, scores, source as a category, and their labels given a truth table), the
    number of samples, and the failed ones by error; each shard read alone with its own sources."""
    parts, samples, failures = [], 0, Counter()
    for name, path in paths.items():
        table = with_sources(config, scan_parquet(path, SCALARS).collect(engine="streaming"), [name])
        if truth is not None:
            table = with_truth(config, table, truth)
        samples += len(table)
        failures.update(dict(table.filter(pl.col("status") == "failed")["error"].value_counts().iter_rows()))
        parts.append(table.filter(pl.col("status") == "scored")
                     .select(pl.exclude("row", "status", "error", "url", "source"), pl.col("source").cast(pl.Categorical)))
    return pl.concat(parts), samples, failures
def noise_facts(scored: pl.DataFrame, summary: dict, resamples: int, seed: int) -> dict:
    """1 - mean(clean_prob), with a bootstrap interval over pairs (on at most 100k of them)."""
    clean = scored["clean_prob"].to_numpy().astype(np.float64)
    if len(clean) == 0:
        return {"estimated_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    rng = np.random.default_rng(seed)
    sample = clean if len(clean) <= 100_000 else rng.choice(clean, 100_000, replace=False)
    means = np.array([sample[rng.integers(0, len(sample), len(sample))].mean() for _ in range(resamples)])
    noise = summary.get("noise", {})
    return {"estimated_rate": float(1 - clean.mean()), "ci_low": float(1 - np.quantile(means, 0.975)),
            "ci_high": float(1 - np.quantile(means, 0.025)),
            "temperature_indicator": noise.get("temperature_indicator"),
            "noisy_component_weight": noise.get("noisy_component_weight")}


def count_facts(config: Config, samples: int, scored: int, failures: dict) -> dict:
    """Counts that reconcile with the shard stage: input rows = scored + failed (score) + failed (shard)."""
    shard = read_json(join(config.shard_dir(), "_summary.json"), {})
    counts = shard.get("counts", {})
    by_reason = [{"stage": "shard", "reason": f"{r['status']}: {r['reason']}", "count": r["count"]}
                 for r in shard.get("failures_by_reason", [])]
    by_reason += [{"stage": "score", "reason": e, "count": c} for e, c in sorted(failures.items(), key=lambda x: (-x[1], x[0] is not None, x[0] or ""))]
    failed = samples - scored
    input_rows = counts.get("input_rows", samples)
    return {"input_rows": input_rows, "samples": samples, "scored": scored, "failed": failed,
            "rejected": counts.get("rejected", 0), "download_failures": counts.get("failures", 0) - counts.get("rejected", 0),
            "reconciled": input_rows == scored + failed + counts.get("failures", 0), "failures_by_reason": by_reason}


def policy_facts(config: Config, paths: list[str]) -> list[dict]:
    """What the configured policy, and each of its steps alone, would keep: the steps' global facts
    once, then each shard's decisions under each choice of steps."""
    steps = [step.model_dump(exclude_defaults=True) for step in config.curate.policy]
    parts, facts = score_facts(config, paths, steps)
    choices = [(s["kind"], describe(s), [i]) for i, s in enumerate(steps)]
    choices += [("all steps together", "", list(range(len(steps))))] if len(steps) > 1 else []
    kept = [0] * len(choices)
    for i, part in enumerate(parts):
        table = part(policy_columns(steps)).collect(engine="streaming")
        for j, (_, _, chosen) in enumerate(choices):
            chosen_facts = {**facts, "steps": [facts["steps"][c] for c in chosen]}
            kept[j] += int(decide(table, [steps[c] for c in chosen], chosen_facts, i)["keep"].sum())
    pairs = int(facts["starts"][-1])
    return [{"policy": label, "threshold": setting, "kept": k, "kept_fraction": k / pairs if pairs else 0.0}
            for (label, setting, _), k in zip(choices, kept)]


def describe(step: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in step.items() if k != "kind")


def policy_curves(scored: pl.DataFrame) -> dict[str, dict]:
    """Kept fraction against each policy's threshold: a curve, not one number."""
    curves = {}
    for column, label in (("clean_prob", "clean_prob >= t"), ("cosine", "cosine >= t (top fraction)"),
                          ("dn_score", "DN score >= t")):
        values = np.sort(scored[column].drop_nulls().to_numpy())
        if len(values) == 0:
            continue
        grid = np.linspace(0, 1, 51) if column == "clean_prob" else np.quantile(values, np.linspace(0, 1, 51))
        kept = 1 - np.searchsorted(values, grid, side="left") / len(values)
        curves[column] = {"threshold": grid.tolist(), "kept_fraction": kept.tolist(), "label": label}
    return curves


def source_facts(scored: pl.DataFrame) -> list[dict]:
    by_source = (scored.group_by("source").agg(pairs=pl.len(), mean_clean_prob=pl.col("clean_prob").mean())
                 .with_columns(pl.col("source").cast(pl.String), estimated_noise=1 - pl.col("mean_clean_prob")).sort("pairs", "source", descending=[True, False]))
    return by_source.head(50).to_dicts()


def detection_facts(known: pl.DataFrame, threshold: float) -> dict:
    """Against the labels table: AUROC, and precision/recall of flagging pairs as noisy.

    The cosine, DN and loss baselines flag as many pairs as clean_prob < threshold does, so the
    precision and recall compare like with like.
    """
    noisy = known["noisy"].to_numpy()
    flagged = int((known["clean_prob"] < threshold).sum())
    rows = []
    for name, noisiness in (("clean_prob", -known["clean_prob"].to_numpy()), ("cosine", -known["cosine"].to_numpy()),
                            ("dn_score", -known["dn_score"].to_numpy()), ("loss", known["loss"].to_numpy())):
        order = np.lexsort((known["key"].to_numpy(), -noisiness))
        flags = np.zeros(len(known), dtype=bool)
        flags[order[:flagged]] = True
        hits = int((flags & noisy).sum())
        rows.append({"score": name, "auroc": auroc(noisy, noisiness), "precision": hits / flagged if flagged else float("nan"),
                     "recall": hits / noisy.sum() if noisy.sum() else float("nan")})
    return {"threshold": threshold, "flagged": flagged, "noisy": int(noisy.sum()), "pairs": len(known), "rows": rows}


FIELDS = ["key", "caption", "url", "clean_prob", "cosine"]  # a gallery card's


def gallery_facts(config: Config, names: list[str], frame: pl.LazyFrame, scored: pl.DataFrame, size: int,
                  duplicate_sim: float) -> dict[str, list[dict]]:
    pairs = scored.lazy().select("key", "clean_prob")  # top-k selections: no sorted copy of every pair
    picked = pl.collect_all([
        pairs.sort("clean_prob", "key").head(size),
        pairs.sort("clean_prob", "key", descending=[True, False]).head(size),
        pairs.with_columns(gap=(pl.col("clean_prob") - 0.5).abs()).sort("gap", "key").head(size),
    ])
    picked = dict(zip(("mismatches", "cleanest", "borderline"), picked))
    by_key = card_fields(config, names, scored, pl.concat([p["key"] for p in picked.values()]))
    galleries = {name: [by_key[k] for k in rows["key"]] for name, rows in picked.items()}
    anchors = frame.filter(pl.col("status") == "scored")
    for side, name, differ in (("image", "duplicate_images", "caption"), ("text", "duplicate_captions", "url")):
        galleries[name] = duplicate_groups(config, names, anchors, scored, side, differ, duplicate_sim, size)
    return galleries


def card_fields(config: Config, names: list[str], scored: pl.DataFrame, keys: pl.Series) -> dict[str, dict]:
    """The gallery fields of the scored pairs among `keys`, by key (caption and url from the shards' parquet)."""
    wanted = scored.select("key", "clean_prob", "cosine").filter(pl.col("key").is_in(keys.implode()))
    rows = shard_rows(config, names, ["key", "caption", "url"]).filter(pl.col("key").is_in(wanted["key"].implode()))
    cards = wanted.lazy().join(rows, on="key", how="left").select(FIELDS).collect(engine="streaming")
    return {row["key"]: row for row in cards.iter_rows(named=True)}


def duplicate_groups(config: Config, names: list[str], frame: pl.LazyFrame, scored: pl.DataFrame, side: str,
                     differ: str, min_sim: float, size: int, batch: int = 256) -> list[dict]:
    """Near-duplicate groups to show: each anchor with its neighbours at >= min_sim whose `differ` field differs.

    Star groups around the closest anchors, not connected components: with a weak teacher the
    similarity graph chains unrelated pairs into one giant component, which shows nothing. Anchors
    are taken in order, `batch` at a time, with the fields of them and their neighbours alone.
    """
    lists = frame.select("key", nn=pl.col(f"{side}_nn_keys"), sims=pl.col(f"{side}_nn_sims"))
    anchors = (lists.select("key", top=pl.col("sims").list.first()).filter(pl.col("top") >= min_sim)
               .sort("top", "key", descending=[True, False]))
    shown: set[str] = set()
    groups: list[dict] = []
    wanted = max(1, size // 2)
    for start in itertools.count(0, batch):
        # the next batch of anchors: the first start + batch (a top-k), not all of them
        keys = anchors.head(start + batch).collect(engine="streaming").slice(start).select("key").with_row_index("at")
        if len(keys) == 0:
            break
        chunk = lists.join(keys.lazy(), on="key").sort("at").drop("at").collect(engine="streaming")
        near = chunk.select("nn", "sims").explode("nn", "sims").filter(pl.col("sims") >= min_sim)["nn"]
        by_key = card_fields(config, names, scored, pl.concat([chunk["key"], near]))
        for anchor in chunk.iter_rows(named=True):
            if len({g["group"] for g in groups}) >= wanted:
                return groups
            if anchor["key"] in shown:
                continue
            members = [k for k, sim in zip(anchor["nn"], anchor["sims"]) if sim >= min_sim and k in by_key and k not in shown]
            members = [k for k in members if by_key[k][differ] != by_key[anchor["key"]][differ]][:3]
            if not members:
                continue
            for key in [anchor["key"], *members]:
                shown.add(key)
                groups.append({**by_key[key], "group": anchor["key"]})
    return groups


def thumbnails(config: Config, keys: set[str]) -> dict[str, bytes]:
    """Small JPEGs of the gallery pairs, read from their shards (only the shards that hold them)."""
    thumbs = {}
    for shard in sorted({k[:5] for k in keys}):  # img2dataset keys start with their shard number
        path = join(config.shard_dir(), f"{shard}.tar")
        if not exists(path):
            continue
        for sample in read_shard(path):
            if sample["__key__"] in keys and "jpg" in sample:
                try:
                    with Image.open(io.BytesIO(sample["jpg"])) as image:
                        image = image.convert("RGB")
                        image.thumbnail((THUMBNAIL, THUMBNAIL))
                        buf = io.BytesIO()
                        image.save(buf, "JPEG", quality=85)
                        thumbs[sample["__key__"]] = buf.getvalue()
                except OSError:
                    pass  # the page shows a placeholder
    return thumbs
