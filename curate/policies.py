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

from typing import Callable

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Why = Callable[[np.ndarray], list[str]]  # the reasons of the rows (indices) a step drops


def threshold(table: pl.DataFrame, column: str, minimum: float) -> tuple[np.ndarray, Why]:
    values = table[column].fill_null(-np.inf).to_numpy()
    keep = values >= minimum
    return keep, lambda rows: [f"{column} {v:.3f} < {minimum:g}" for v in values[rows]]


def top_fraction(table: pl.DataFrame, column: str, fraction: float) -> tuple[np.ndarray, Why]:
    """The `fraction` of scored pairs with the highest values; ties broken by key, so the count is exact."""
    values = table[column].fill_null(-np.inf).to_numpy()
    order = table.select(i=pl.int_range(pl.len()), key="key", v=-values).sort(["v", "key"], maintain_order=True)["i"].to_numpy()
    n_keep = int(round(fraction * np.isfinite(values).sum()))
    keep = np.zeros(len(values), dtype=bool)
    keep[order[:n_keep]] = True
    cut = values[order[n_keep - 1]] if n_keep else np.inf
    return keep, lambda rows: [f"{column} {v:.3f} below the top {fraction:.0%} ({cut:.3f})" for v in values[rows]]


def duplicate_clusters(table: pl.DataFrame, side: str, min_sim: float,
                       neighbours: pl.LazyFrame | None = None) -> np.ndarray:
    """A cluster id per row: connected components of the neighbour graph with similarity >= min_sim.

    `neighbours` holds the rows' `{side}_nn_keys`/`_sims` in the table's row order (by default the
    table itself); only the edges above min_sim are collected, as two integer arrays."""
    neighbours = table.lazy() if neighbours is None else neighbours
    index = table.select("key").with_row_index("j").unique("key", keep="last")  # a repeated key names its last row
    keys, sims = f"{side}_nn_keys", f"{side}_nn_sims"
    edges = (neighbours.select(keys, sims).with_row_index("i").explode(keys, sims)
             .filter(pl.col(sims) >= min_sim).select("i", key=keys)
             .join(index.lazy(), on="key").select("i", "j").collect(engine="streaming"))
    rows, cols = edges["i"].to_numpy(), edges["j"].to_numpy()
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(table), len(table)))
    return connected_components(graph, directed=False)[1]


def dedup(table: pl.DataFrame, side: str, min_sim: float,
          neighbours: pl.LazyFrame | None = None) -> tuple[np.ndarray, Why]:
    """Keep the pair with the highest clean_prob (then smallest key) of each near-duplicate cluster."""
    clusters = duplicate_clusters(table, side, min_sim, neighbours)
    ranked = (table.select("key", pl.col("clean_prob").fill_null(-1.0)).with_columns(cluster=clusters)
              .sort(["cluster", "clean_prob", "key"], descending=[False, True, False]))
    first = ranked.group_by("cluster", maintain_order=True).agg(keeper=pl.col("key").first())
    keeper = (table.select("key").with_columns(cluster=clusters)
              .join(first, on="cluster", how="left", maintain_order="left")["keeper"])
    keep = (keeper == table["key"]).to_numpy()
    return keep, lambda rows: [f"near-duplicate ({side}) of {k}" for k in keeper.gather(rows).to_list()]


def apply_policy(table: pl.DataFrame, steps: list[dict], neighbours: pl.LazyFrame | None = None) -> pl.DataFrame:
    """(key, keep, weight, reason) for every row of the scores table; failed rows are never kept.

    A dedup step reads its neighbour lists from `neighbours` (the table's rows, in order) when given,
    so the table itself need not hold them."""
    scored = (table["status"] == "scored").fill_null(False).to_numpy()
    keep = scored.copy()
    reasons = table.select(pl.when(pl.col("status") == "scored").then(None)
                           .otherwise(pl.format("not scored: {}", pl.col("error").fill_null("None"))))
    reasons = reasons.to_series().rename("reason")
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
            step_keep, why = dedup(table, step.get("side", "image"), step["min_sim"], neighbours)
        else:
            raise ValueError(f"unknown policy step {kind!r}")
        dropped = np.flatnonzero(keep & ~step_keep)
        if len(dropped):
            reasons = reasons.scatter(dropped, pl.Series(why(dropped), dtype=pl.String))
        keep &= step_keep
    return pl.DataFrame({"key": table["key"], "keep": keep, "weight": np.where(keep, weight, 0.0),
                         "reason": reasons}, schema={"key": pl.String, "keep": pl.Boolean, "weight": pl.Float32,
                                                     "reason": pl.String})


def policy_columns(steps: list[dict]) -> list[str]:
    """The scalar columns of the scores table the steps read (dedup also reads its side's neighbour lists)."""
    columns = {"key", "status", "error"}
    for step in steps:
        columns |= {"clean_prob": {"clean_prob"}, "cosine_top": {"cosine"}, "dn_top": {"dn_score"},
                    "dedup": {"clean_prob"}, "reweight": {step.get("by", "clean_prob")}}.get(step["kind"], set())
    return sorted(columns)
