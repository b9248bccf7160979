"""Selection policies: plain functions over the scores table (polars), each a keep mask with a reason.

A policy is a list of steps applied in order; a pair is kept when every step keeps it, its reason is
the first step that dropped it, and its weight the product of the reweighting steps (1 otherwise).

    clean_prob  {min}        keep pairs the audit believes (clean_prob >= min)
    cosine_top  {fraction}   keep the top fraction by raw cosine (DataComp's CLIP-score filter)
    dn_top      {fraction}   the same on the DN score
    dedup       {side, min_sim}  one pair per near-duplicate cluster (image-image or text-text neighbours)
    reweight    {by}         keep everything, weight = the column (e.g. clean_prob)
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def threshold(table: pl.DataFrame, column: str, minimum: float) -> tuple[np.ndarray, list[str | None]]:
    values = table[column].fill_null(-np.inf).to_numpy()
    keep = values >= minimum
    return keep, [None if k else f"{column} {v:.3f} < {minimum:g}" for k, v in zip(keep, values)]


def top_fraction(table: pl.DataFrame, column: str, fraction: float) -> tuple[np.ndarray, list[str | None]]:
    """The `fraction` of scored pairs with the highest values; ties broken by key, so the count is exact."""
    values = table[column].fill_null(-np.inf).to_numpy()
    order = np.lexsort((table["key"].to_numpy(), -values))
    n_keep = int(round(fraction * np.isfinite(values).sum()))
    keep = np.zeros(len(values), dtype=bool)
    keep[order[:n_keep]] = True
    cut = values[order[n_keep - 1]] if n_keep else np.inf
    return keep, [None if k else f"{column} {v:.3f} below the top {fraction:.0%} ({cut:.3f})" for k, v in zip(keep, values)]


def duplicate_clusters(table: pl.DataFrame, side: str, min_sim: float) -> np.ndarray:
    """A cluster id per row: connected components of the neighbour graph with similarity >= min_sim."""
    keys = table["key"].to_list()
    index = {k: i for i, k in enumerate(keys)}
    edges = (table.select(pl.int_range(pl.len()).alias("i"), f"{side}_nn_keys", f"{side}_nn_sims")
             .explode(f"{side}_nn_keys", f"{side}_nn_sims")
             .filter(pl.col(f"{side}_nn_sims") >= min_sim))
    rows = edges["i"].to_numpy()
    cols = np.asarray([index.get(k, -1) for k in edges[f"{side}_nn_keys"].to_list()], dtype=np.int64)
    rows, cols = rows[cols >= 0], cols[cols >= 0]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(keys), len(keys)))
    return connected_components(graph, directed=False)[1]


def dedup(table: pl.DataFrame, side: str, min_sim: float) -> tuple[np.ndarray, list[str | None]]:
    """Keep the pair with the highest clean_prob (then smallest key) of each near-duplicate cluster."""
    clusters = duplicate_clusters(table, side, min_sim)
    ranked = (table.select("key", pl.col("clean_prob").fill_null(-1.0)).with_columns(cluster=clusters)
              .with_row_index("i").sort(["cluster", "clean_prob", "key"], descending=[False, True, False]))
    first = ranked.group_by("cluster", maintain_order=True).first()
    keeper = dict(zip(first["cluster"].to_list(), first["key"].to_list()))
    keys = table["key"].to_list()
    keep = np.asarray([keeper[c] == k for c, k in zip(clusters, keys)])
    return keep, [None if k else f"near-duplicate ({side}) of {keeper[c]}" for k, c in zip(keep, clusters)]


def apply_policy(table: pl.DataFrame, steps: list[dict]) -> pl.DataFrame:
    """(key, keep, weight, reason) for every row of the scores table; failed rows are never kept."""
    scored = (table["status"] == "scored").to_numpy()
    keep = scored.copy()
    reasons: list[str | None] = [None if ok else f"not scored: {err}" for ok, err in zip(scored, table["error"].to_list())]
    weight = np.ones(len(table))
    for step in steps:
        kind = step["kind"]
        if kind == "reweight":
            weight *= np.where(scored, table[step.get("by", "clean_prob")].fill_null(0.0).to_numpy(), 0.0)
            continue
        if kind == "clean_prob":
            step_keep, why = threshold(table, "clean_prob", step["min"])
        elif kind == "cosine_top":
            step_keep, why = top_fraction(table, "cosine", step["fraction"])
        elif kind == "dn_top":
            step_keep, why = top_fraction(table, "dn_score", step["fraction"])
        elif kind == "dedup":
            step_keep, why = dedup(table, step.get("side", "image"), step["min_sim"])
        else:
            raise ValueError(f"unknown policy step {kind!r}")
        for i in np.flatnonzero(keep & ~step_keep):
            reasons[i] = why[i]
        keep &= step_keep
    return pl.DataFrame({"key": table["key"], "keep": keep, "weight": np.where(keep, weight, 0.0),
                         "reason": reasons}, schema={"key": pl.String, "keep": pl.Boolean, "weight": pl.Float32,
                                                     "reason": pl.String})
