"""The streamed curate and score summary against the eager ones they replaced: the same keep.parquet,
byte for byte, and the same summary, on a synthetic scores root with failures, ties, missing values
and near-duplicate clusters across shards. The eager references (the whole scores table in memory,
Python lists and dicts over the rows) are kept here."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import config_for
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from test_policies import clusters_of

from curate.policies import apply_policy
from curate.scores import NOISY_WHEN, auroc, detection_report
from pipelines import audit
from pipelines.curate import run_curate
from pipelines.io import SCORE_COLUMNS, read_parquet, read_scores, read_table, read_truth, with_truth, write_parquet
from pipelines.score import summarize

PER_SHARD, SHARDS, K = 300, 3, 4


def reference_clusters(table, side, min_sim):
    keys = table["key"].to_list()
    index = {k: i for i, k in enumerate(keys)}
    edges = (table.select(pl.int_range(pl.len()).alias("i"), f"{side}_nn_keys", f"{side}_nn_sims")
             .explode(f"{side}_nn_keys", f"{side}_nn_sims").filter(pl.col(f"{side}_nn_sims") >= min_sim))
    rows = edges["i"].to_numpy()
    cols = np.asarray([index.get(k, -1) for k in edges[f"{side}_nn_keys"].to_list()], dtype=np.int64)
    rows, cols = rows[cols >= 0], cols[cols >= 0]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(keys), len(keys)))
    return connected_components(graph, directed=False)[1]


def reference_policy(table, steps):
    def threshold(column, minimum):
        values = table[column].fill_null(-np.inf).to_numpy()
        keep = values >= minimum
        return keep, [None if k else f"{column} {v:.3f} < {minimum:g}" for k, v in zip(keep, values)]

    def top_fraction(column, fraction):
        values = table[column].fill_null(-np.inf).to_numpy()
        order = np.lexsort((table["key"].to_numpy(), -values))
        n_keep = int(round(fraction * np.isfinite(values).sum()))
        keep = np.zeros(len(values), dtype=bool)
        keep[order[:n_keep]] = True
        cut = values[order[n_keep - 1]] if n_keep else np.inf
        return keep, [None if k else f"{column} {v:.3f} below the top {fraction:.0%} ({cut:.3f})" for k, v in zip(keep, values)]

    def dedup(side, min_sim):
        clusters = reference_clusters(table, side, min_sim)
        ranked = (table.select("key", pl.col("clean_prob").fill_null(-1.0)).with_columns(cluster=clusters)
                  .with_row_index("i").sort(["cluster", "clean_prob", "key"], descending=[False, True, False]))
        first = ranked.group_by("cluster", maintain_order=True).first()
        keeper = dict(zip(first["cluster"].to_list(), first["key"].to_list()))
        keep = np.asarray([keeper[c] == k for c, k in zip(clusters, table["key"].to_list())])
        return keep, [None if k else f"near-duplicate ({side}) of {keeper[c]}" for k, c in zip(keep, clusters)]

    scored = (table["status"] == "scored").to_numpy()
    keep = scored.copy()
    reasons = [None if ok else f"not scored: {err}" for ok, err in zip(scored, table["error"].to_list())]
    weight = np.ones(len(table))
    for step in steps:
        kind = step["kind"]
        if kind == "reweight":
            weight *= np.where(scored, table[step.get("by", "clean_prob")].fill_null(0.0).to_numpy(), 0.0)
            continue
        step_keep, why = {"clean_prob": lambda: threshold("clean_prob", step["min"]),
                          "cosine_top": lambda: top_fraction("cosine", step["fraction"]),
                          "dn_top": lambda: top_fraction("dn_score", step["fraction"]),
                          "dedup": lambda: dedup(step.get("side", "image"), step["min_sim"])}[kind]()
        for i in np.flatnonzero(keep & ~step_keep):
            reasons[i] = why[i]
        keep &= step_keep
    return pl.DataFrame({"key": table["key"], "keep": keep, "weight": np.where(keep, weight, 0.0), "reason": reasons},
                        schema={"key": pl.String, "keep": pl.Boolean, "weight": pl.Float32, "reason": pl.String})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Scores files like the score stage's (no embeddings): 5% failed, a few missing clean_probs, cosines
    rounded so that ties happen, and neighbours that cross shards with similarities near the cut."""
    root = tmp_path_factory.mktemp("streamed")
    (root / "shards").mkdir()
    (root / "scores").mkdir()
    rng = np.random.default_rng(0)
    n = PER_SHARD * SHARDS
    keys = np.asarray([f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}" for i in range(n)])
    for shard in range(SHARDS):
        rows = np.arange(shard * PER_SHARD, (shard + 1) * PER_SHARD)
        failed = rng.random(PER_SHARD) < 0.05
        cosine = np.round(rng.normal(0.25, 0.06, PER_SHARD), 2).astype(np.float32)
        clean_prob = rng.random(PER_SHARD).astype(np.float32)
        nn = [[] if i % 50 == 7 else keys[rng.integers(0, n, K)].tolist() for i in range(PER_SHARD)]  # some empty lists
        sims = [np.sort(rng.uniform(0.8, 1.0, len(k)))[::-1].astype(np.float32).tolist() for k in nn]
        table = pl.DataFrame({
            "key": keys[rows], "row": rows, "status": np.where(failed, "failed", "scored"),
            "error": ["empty caption" if f else None for f in failed], "cosine": np.where(failed, np.nan, cosine),
            "dn_score": np.where(failed, np.nan, cosine - 0.1), "loss": -np.log(clean_prob + 1e-3),
            "clean_prob": pl.Series(np.where(failed, np.nan, clean_prob)).fill_nan(None),
            "loss_by_checkpoint": rng.normal(5, 1, (PER_SHARD, 2)).astype(np.float32).tolist(), "image_nn_keys": nn, "image_nn_sims": sims, "text_nn_keys": nn[::-1], "text_nn_sims": sims[::-1]},
            schema_overrides={"error": pl.String, "cosine": pl.Float32, "dn_score": pl.Float32, "loss": pl.Float32,
                              "clean_prob": pl.Float32, "loss_by_checkpoint": pl.List(pl.Float32), "image_nn_sims": pl.List(pl.Float32),
                              "text_nn_sims": pl.List(pl.Float32)})
        table = table.with_columns(pl.col("cosine", "dn_score").fill_nan(None))
        table.write_parquet(root / "scores" / f"{shard:05d}.parquet")
        hosts = rng.choice(["a.example.com", "b.example.org", "c.example.net"], PER_SHARD)
        pl.DataFrame({"key": keys[rows], "url": [f"http://{h}/{i % 40}.jpg" for h, i in zip(hosts, rows)],
                      "caption": [f"caption {i}" for i in rng.integers(0, 30, PER_SHARD)], "status": ["success"] * PER_SHARD}
                     ).write_parquet(root / "shards" / f"{shard:05d}.parquet")
    pl.DataFrame({"key": keys, "noisy": rng.random(n) < 0.3, "noise_type": rng.choice(["swap", "blur"], n)}
                 ).write_parquet(root / "truth.parquet")
    (root / "shards" / "_summary.json").write_text(json.dumps({"shards": [f"{s:05d}.tar" for s in range(SHARDS)]}))
    return root


POLICIES = [
    "[{kind: clean_prob, min: 0.5}]",
    "[{kind: cosine_top, fraction: 0.3}, {kind: dn_top, fraction: 0.8}]",
    "[{kind: clean_prob, min: 0.2}, {kind: dedup, side: image, min_sim: 0.98}, {kind: reweight, by: clean_prob}]",
    "[{kind: dedup, side: text, min_sim: 0.99}, {kind: cosine_top, fraction: 0.5}]",
]


@pytest.mark.parametrize("policy", POLICIES)
def test_streamed_keep_list_is_byte_identical_to_the_eager_one(root, tmp_path, policy):
    config = config_for(root, f"curate.output={tmp_path / 'curated'}", f"curate.policy={policy}")
    summary = run_curate(config, export=False)
    scores = pl.concat([pl.read_parquet(root / "scores" / f"{s:05d}.parquet", columns=SCORE_COLUMNS)
                        for s in range(SHARDS)])
    write_parquet(str(tmp_path / "reference.parquet"), reference_policy(scores, summary["policy"]))
    assert (tmp_path / "curated" / "keep.parquet").read_bytes() == (tmp_path / "reference.parquet").read_bytes()
    assert 0 < summary["kept"] < summary["pairs"] == PER_SHARD * SHARDS


@pytest.mark.parametrize("side, min_sim", [("image", 0.97), ("text", 0.9), ("image", 1.01)])
def test_clusters_from_streamed_edges_are_the_eager_ones(root, side, min_sim):
    scores = pl.concat([pl.read_parquet(p) for p in sorted((root / "scores").glob("*.parquet"))])
    streamed = clusters_of(scores.select("key"), side, min_sim, scores.lazy())
    assert (streamed == reference_clusters(scores, side, min_sim)).all()
    assert len(set(streamed)) < len(scores) or min_sim > 1


def test_apply_policy_on_the_whole_table_equals_the_reference(root):
    scores = pl.concat([pl.read_parquet(p) for p in sorted((root / "scores").glob("*.parquet"))])
    steps = [{"kind": "clean_prob", "min": 0.3}, {"kind": "dedup", "side": "image", "min_sim": 0.95}]
    assert apply_policy(scores, steps).equals(reference_policy(scores, steps))


def reference_summary_rows(config, score_paths, teacher):
    """The table-derived parts of the eager summarize: counts, failures by reason, noise rate, detection."""
    names = ["key", "row", "status", "error", "cosine", "dn_score", "loss", "clean_prob"]
    table = pa.concat_tables([read_table(p, names + (["loss_by_checkpoint"] if len(teacher["checkpoints"]) > 1 else []))
                              for p in score_paths])
    ok = np.asarray(table["status"].to_pylist()) == "scored"
    clean_prob = table["clean_prob"].to_numpy(zero_copy_only=False)[ok]
    errors = [e for e in table["error"].to_pylist() if e]
    scored = pl.from_arrow(table).filter(pl.col("status") == "scored")
    known = with_truth(config, scored, read_truth(config.truth)).filter(pl.col("noisy").is_not_null())
    noisy, kinds = known["noisy"].to_numpy(), known["noise_type"].to_numpy()
    detection = {"truth": config.truth, **detection_report(noisy, kinds, {n: known[n].to_numpy() for n in NOISY_WHEN})}
    per = np.asarray(known["loss_by_checkpoint"].to_list())
    detection["auroc_by_checkpoint"] = [
        {"checkpoint": c, "loss": auroc(noisy, per[:, j]),
         "by_kind": {kind: auroc(noisy[(kinds == kind) | ~noisy], per[(kinds == kind) | ~noisy, j]) for kind in detection["by_kind"]}}
        for j, c in enumerate(teacher["checkpoints"])]
    return {"counts": {"samples": len(table), "scored": int(ok.sum()), "failed": int((~ok).sum()),
                       "failed_by_reason": {r: errors.count(r) for r in sorted(set(errors))}},
            "estimated_rate": float(1 - clean_prob.mean()), "pairs_per_second": round(len(table) / 2.0, 1),
            "detection": detection}


def test_streamed_score_summary_equals_the_eager_one(root):
    config = config_for(root, f"truth={root / 'truth.parquet'}")
    paths = [str(p) for p in sorted((root / "scores").glob("*.parquet"))]
    teacher = {"model": "synthetic", "checkpoints": ["a.pt", "b.pt"], "loss_rule": "early", "epochs": [1, 2],
               "digests": [], "sentence_teacher": None}
    state = {"checkpoints": [{"scale": 50.0, "mu_v": np.zeros(2), "mu_t": np.zeros(2)}], "averaged": [0, 1],
             "noise_by_epoch": {}, "lambda": 1.0, "bank_keys": [], "sample_sizes": {}, "k": K,
             "mixture": {"weights": [0.7, 0.3]}, "temperature_indicator": 0.1}
    summary = summarize(config, paths, state, {"method": "exact"}, teacher, {"embed": 2.0}, {})
    reference = reference_summary_rows(config, paths, teacher)
    assert summary["counts"] == reference["counts"] and summary["counts"]["failed_by_reason"]
    assert summary["noise"]["estimated_rate"] == reference["estimated_rate"]
    assert summary["pairs_per_second"] == reference["pairs_per_second"]
    assert summary["detection"] == reference["detection"] and len(summary["detection"]["auroc_by_checkpoint"]) == 2


def reference_shard_rows(config, scores, names):
    shard_rows = pl.concat([read_parquet(f"{config.shard_dir()}/{name}.parquet", ["key", "url", "caption"]) for name in names])
    return scores.join(shard_rows, on="key", how="left").with_columns(
        source=pl.col("url").str.extract(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/:?#]+)", 1).fill_null("unknown"))


def reference_galleries(scored, size, duplicate_sim):
    fields = ["key", "caption", "url", "clean_prob", "cosine"]
    galleries = {
        "mismatches": scored.sort("clean_prob", "key").head(size).select(fields).to_dicts(),
        "cleanest": scored.sort("clean_prob", "key", descending=[True, False]).head(size).select(fields).to_dicts(),
        "borderline": scored.with_columns(gap=(pl.col("clean_prob") - 0.5).abs()).sort("gap", "key").head(size)
                            .select(fields).to_dicts(),
    }
    for side, name, differ in (("image", "duplicate_images", "caption"), ("text", "duplicate_captions", "url")):
        by_key = {row["key"]: row for row in scored.select(fields).iter_rows(named=True)}
        anchors = (scored.select("key", differ, nn=pl.col(f"{side}_nn_keys"), sims=pl.col(f"{side}_nn_sims"))
                   .with_columns(top=pl.col("sims").list.first()).filter(pl.col("top") >= duplicate_sim)
                   .sort("top", "key", descending=[True, False]))
        shown, groups, wanted = set(), [], max(1, size // 2)
        for anchor in anchors.iter_rows(named=True):
            if len({g["group"] for g in groups}) >= wanted:
                break
            if anchor["key"] in shown:
                continue
            members = [k for k, sim in zip(anchor["nn"], anchor["sims"]) if sim >= duplicate_sim and k in by_key and k not in shown]
            members = [k for k in members if by_key[k][differ] != anchor[differ]][:3]
            if not members:
                continue
            for key in [anchor["key"], *members]:
                shown.add(key)
                groups.append({**by_key[key], "group": anchor["key"]})
        galleries[name] = groups
    return galleries


def reference_counts(config, table):
    shard = json.loads(Path(config.shard_dir(), "_summary.json").read_text())
    counts = shard.get("counts", {})
    failures = [{"stage": "shard", "reason": f"{r['status']}: {r['reason']}", "count": r["count"]}
                for r in shard.get("failures_by_reason", [])]
    score_failures = table.filter(pl.col("status") == "failed").group_by("error").len().sort("len", "error", descending=[True, False])
    failures += [{"stage": "score", "reason": e, "count": c} for e, c in score_failures.iter_rows()]
    scored = int((table["status"] == "scored").sum())
    failed = len(table) - scored
    input_rows = counts.get("input_rows", len(table))
    return {"input_rows": input_rows, "samples": len(table), "scored": scored, "failed": failed,
            "rejected": counts.get("rejected", 0), "download_failures": counts.get("failures", 0) - counts.get("rejected", 0),
            "reconciled": input_rows == scored + failed + counts.get("failures", 0), "failures_by_reason": failures}


def reference_policy_facts(table, config):
    steps = [step.model_dump(exclude_defaults=True) for step in config.curate.policy]
    rows = []
    for label, setting, chosen in [*((s["kind"], audit.describe(s), [s]) for s in steps), ("all steps together", "", steps)]:
        kept = int(reference_policy(table, chosen)["keep"].sum())
        rows.append({"policy": label, "threshold": setting, "kept": kept, "kept_fraction": kept / len(table)})
    return rows


@pytest.mark.parametrize("size, duplicate_sim", [(12, 0.98), (40, 0.9)])
def test_streamed_audit_facts_and_galleries_equal_the_eager_ones(root, tmp_path, size, duplicate_sim):
    config = config_for(root, f"truth={root / 'truth.parquet'}", f"audit.output={tmp_path / 'audit'}",
                        "curate.policy=[{kind: clean_prob, min: 0.4}, {kind: dedup, side: image, min_sim: 0.98}]")
    facts = audit.run_audit(config)
    scores, names, _ = read_scores(config)
    table = with_truth(config, reference_shard_rows(config, scores, names), read_truth(config.truth))
    scored = table.filter(pl.col("status") == "scored")
    assert facts["counts"] == reference_counts(config, table)
    assert facts["policies"] == reference_policy_facts(table, config) and facts["policies"][1]["kept"] < len(table)
    assert facts["sources"] == audit.source_facts(scored)
    assert facts["noise"] == audit.noise_facts(scored, {}, config.audit.bootstrap, config.seed)
    assert facts["detection"] == audit.detection_facts(scored.filter(pl.col("noisy").is_not_null()), config.audit.threshold)
    frame, names, _ = audit.scan_scores(config)
    streamed = audit.gallery_facts(config, names, frame, scored.drop("url", "caption"), size, duplicate_sim)
    reference = reference_galleries(scored, size, duplicate_sim)
    assert streamed == reference and reference["duplicate_images"] and reference["duplicate_captions"]


@pytest.mark.parametrize("policy", [POLICIES[0], POLICIES[2]])
def test_streamed_keep_list_on_the_scored_demo_world(scored, tmp_path, policy):
    """The same on the demo world as the score stage scored it (its failures, ties and neighbour keys)."""
    root, _ = scored
    config = config_for(root, f"curate.output={tmp_path / 'curated'}", f"curate.policy={policy}")
    summary = run_curate(config, export=False)
    scores = read_scores(config, SCORE_COLUMNS)[0]
    write_parquet(str(tmp_path / "reference.parquet"), reference_policy(scores, summary["policy"]))
    assert (tmp_path / "curated" / "keep.parquet").read_bytes() == (tmp_path / "reference.parquet").read_bytes()
    assert 0 < summary["kept"] < summary["pairs"]
