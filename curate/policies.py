"""Selection policies: plain functions over the scores (polars, numpy), each a keep mask with a reason.

A policy is a list of steps applied in order; a pair is kept when every step keeps it, its reason is
the first step that dropped it, and its weight the product of the reweighting steps (1 otherwise).

    clean_prob  {min}        keep pairs the audit believes (clean_prob >= min)
    cosine_top  {fraction}   keep the top fraction by raw cosine (DataComp's CLIP-score filter)
    dn_top      {fraction}   the same on the DN score
    dedup       {side, min_sim}  one pair per near-duplicate cluster (image-image or text-text neighbours)
    reweight    {by}         keep everything, weight = the column (e.g. clean_prob)

The scores come in parts (a scores file each), read one at a time, so that a policy streams:
`global_facts` reads what the steps need of every pair into small arrays (the cut of each top
fraction, the keeper of each near-duplicate cluster), then `decide` gives one part's decisions.
A part is a function from the columns it is asked for to a LazyFrame of them.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Part = Callable[[list[str]], pl.LazyFrame]
Why = Callable[[np.ndarray], list[str]]  # the reasons of the rows (indices) a step drops
TOP = {"cosine_top": "cosine", "dn_top": "dn_score"}
DIGITS = r"^[0-9]+$"


class NumericKeys:
    """img2dataset's keys: digits of one width, so a key is an int64 id that sorts as the key does."""

    def __init__(self):
        self.width = None

    def ids(self, keys: pl.Series) -> np.ndarray:
        if len(keys) == 0:
            return np.empty(0, dtype=np.int64)
        widths = keys.str.len_bytes().unique()
        if keys.null_count() or len(widths) > 1 or not keys.str.contains(DIGITS).all() or self.width not in (None, widths[0]):
            raise ValueError(f"sample keys must be img2dataset's (digits of one width), got e.g. {keys.head(3).to_list()}")
        self.width = widths[0]
        return keys.cast(pl.Int64).to_numpy()

    def lookup(self, keys: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the `keys` that can be a pair's key, and where they are."""
        found = ((keys.str.len_bytes() == self.width) & keys.str.contains(DIGITS)).fill_null(False)
        return keys.filter(found).cast(pl.Int64).to_numpy(), found.to_numpy()

    def names(self, ids: np.ndarray) -> list[str]:
        return pl.Series(ids, dtype=pl.Int64).cast(pl.String).str.zfill(self.width).to_list()


class TableKeys:
    """Any keys of one table in memory: a key's id is its rank among the table's keys."""

    def __init__(self, keys: pl.Series):
        self.sorted = keys.drop_nulls().unique().sort()

    def ids(self, keys: pl.Series) -> np.ndarray:
        return self.sorted.search_sorted(keys).to_numpy().astype(np.int64)

    def lookup(self, keys: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        if len(self.sorted) == 0:
            return np.empty(0, dtype=np.int64), np.zeros(len(keys), dtype=bool)
        at = self.sorted.search_sorted(keys.fill_null("")).clip(0, len(self.sorted) - 1)
        found = (self.sorted.gather(at) == keys).fill_null(False)
        return at.filter(found).to_numpy().astype(np.int64), found.to_numpy()

    def names(self, ids: np.ndarray) -> list[str]:
        return self.sorted.gather(ids).to_list()


def part_sizes(parts: list[Part]) -> np.ndarray:
    return np.asarray([part(["key"]).select(pl.len()).collect().item() for part in parts], dtype=np.int64)


def global_facts(parts: list[Part], steps: list[dict], keys) -> dict:
    """What the steps need to know of every pair before deciding any, read a part at a time.

    The pairs are numbered in part order; per pair only numbers are held: the key ids, a step's
    column, the cluster labels and their keepers."""
    sizes = part_sizes(parts)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    facts = {"starts": starts, "keys": keys, "steps": [None] * len(steps)}
    columns = sorted({TOP[s["kind"]] for s in steps if s["kind"] in TOP} | ({"clean_prob"} if dedups(steps) else set()))
    if not columns:
        return facts
    ids, values = np.empty(starts[-1], dtype=np.int64), {}
    for part, start, end in zip(parts, starts, starts[1:]):
        table = part(["key", *columns]).collect(engine="streaming")
        ids[start:end] = keys.ids(table["key"])
        for c in columns:  # missing values as the steps see them, in the column's own type
            column = table[c].fill_null(-1.0 if c == "clean_prob" else -np.inf).to_numpy()
            values.setdefault(c, np.empty(starts[-1], dtype=column.dtype))[start:end] = column
    values = {c: values.get(c, np.empty(0)) for c in columns}  # no pairs at all
    for i, step in enumerate(steps):
        if step["kind"] in TOP:
            facts["steps"][i] = top_cut(values[TOP[step["kind"]]], ids, step["fraction"])
        elif step["kind"] == "dedup":
            clusters = duplicate_clusters(parts, starts, step.get("side", "image"), step["min_sim"], keys, ids)
            facts["steps"][i] = {"clusters": clusters, "keeper": keepers(clusters, values["clean_prob"], ids)}
    return facts


def dedups(steps: list[dict]) -> bool:
    return any(s["kind"] == "dedup" for s in steps)


def top_cut(values: np.ndarray, ids: np.ndarray, fraction: float) -> dict:
    """The last pair kept in the order (value desc, key asc, row asc), of round(fraction * finite values)."""
    n_keep = int(round(fraction * np.isfinite(values).sum()))
    if n_keep == 0:
        return {"n_keep": 0, "value": np.inf}
    order = np.where(np.isnan(values), np.inf, -values.astype(np.float64))  # missing values last, as a sort puts NaN
    at = np.partition(order, n_keep - 1)[n_keep - 1]
    tied = np.flatnonzero(order == at)
    row = tied[np.lexsort((tied, ids[tied]))][n_keep - 1 - int((order < at).sum())]
    return {"n_keep": n_keep, "value": float(values[row]), "order": float(at), "id": ids[row], "row": row}


def duplicate_clusters(parts: list[Part], starts: np.ndarray, side: str, min_sim: float, keys,
                       ids: np.ndarray) -> np.ndarray:
    """A cluster label per pair: connected components of the neighbour graph with similarity >= min_sim.

    Only the edges above min_sim are held, as two integer arrays; a neighbour's key is found by its
    id (a repeated key names its last row)."""
    in_order = bool(np.all(ids[1:] >= ids[:-1]))  # as the shard stage writes them: no sort to hold
    by_id = None if in_order else np.argsort(ids, kind="stable")
    sorted_ids = ids if in_order else ids[by_id]
    rows, cols = [], []
    nn_keys, nn_sims = f"{side}_nn_keys", f"{side}_nn_sims"
    for part, start in zip(parts, starts):
        edges = (part([nn_keys, nn_sims]).with_row_index("i").explode(nn_keys, nn_sims)
                 .filter(pl.col(nn_sims) >= min_sim).select("i", key=nn_keys).collect(engine="streaming"))
        nn, found = keys.lookup(edges["key"])
        at = np.searchsorted(sorted_ids, nn, side="right") - 1
        hit = (at >= 0) & (sorted_ids[at.clip(0)] == nn)
        rows.append(edges["i"].to_numpy()[found][hit].astype(np.int64) + start)
        cols.append(at[hit] if in_order else by_id[at[hit]])
    rows, cols = np.concatenate([np.empty(0, np.int64), *rows]), np.concatenate([np.empty(0, np.int64), *cols])
    n = len(ids)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def keepers(clusters: np.ndarray, clean_prob: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The key id kept in each cluster: the highest clean_prob, then the smallest key."""
    keeper = np.empty(clusters.max() + 1 if len(clusters) else 0, dtype=np.int64)
    keeper[clusters] = ids  # a cluster of one keeps its pair
    shared = np.flatnonzero(np.bincount(clusters)[clusters] > 1)
    best = np.where(np.isnan(clean_prob[shared]), -np.inf, -clean_prob[shared])  # a sort puts NaN first when descending
    ranked = shared[np.lexsort((ids[shared], best, clusters[shared]))]
    first = ranked[np.r_[True, clusters[ranked][1:] != clusters[ranked][:-1]]] if len(ranked) else ranked
    keeper[clusters[first]] = ids[first]
    return keeper


def threshold(table: pl.DataFrame, column: str, minimum: float) -> tuple[np.ndarray, Why]:
    values = table[column].fill_null(-np.inf).to_numpy()
    keep = values >= minimum
    return keep, lambda rows: [f"{column} {v:.3f} < {minimum:g}" for v in values[rows]]


def top_fraction(table: pl.DataFrame, column: str, fraction: float, cut: dict, ids: np.ndarray,
                 rows: np.ndarray) -> tuple[np.ndarray, Why]:
    """The `fraction` of scored pairs with the highest values; ties broken by key, so the count is exact."""
    values = table[column].fill_null(-np.inf).to_numpy()
    if cut["n_keep"] == 0:
        keep = np.zeros(len(values), dtype=bool)
    else:
        order = np.where(np.isnan(values), np.inf, -values.astype(np.float64))
        keep = (order < cut["order"]) | ((order == cut["order"]) & ((ids < cut["id"]) | ((ids == cut["id"]) & (rows <= cut["row"]))))
    return keep, lambda dropped: [f"{column} {v:.3f} below the top {fraction:.0%} ({cut['value']:.3f})" for v in values[dropped]]


def dedup(side: str, facts: dict, keys, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, Why]:
    """Keep the pair with the highest clean_prob (then smallest key) of each near-duplicate cluster."""
    keeper = facts["keeper"][facts["clusters"][rows]]
    return keeper == ids, lambda dropped: [f"near-duplicate ({side}) of {k}" for k in keys.names(keeper[dropped])]


def decide(table: pl.DataFrame, steps: list[dict], facts: dict, part: int) -> pl.DataFrame:
    """(key, keep, weight, reason) for every row of one part of the scores; failed rows are never kept."""
    start = facts["starts"][part]
    rows = np.arange(start, start + len(table))
    ids = facts["keys"].ids(table["key"]) if any(f is not None for f in facts["steps"]) else None
    scored = (table["status"] == "scored").fill_null(False).to_numpy()
    keep = scored.copy()
    reasons = table.select(pl.when(pl.col("status") == "scored").then(None)
                           .otherwise(pl.format("not scored: {}", pl.col("error").fill_null("None"))))
    reasons = reasons.to_series().rename("reason")
    weight = np.ones(len(table))
    for step, step_facts in zip(steps, facts["steps"]):
        kind = step["kind"]
        if kind == "reweight":
            weight *= np.where(scored, table[step.get("by", "clean_prob")].fill_null(0.0).to_numpy(), 0.0)
            continue
        if kind == "clean_prob":
            step_keep, why = threshold(table, "clean_prob", step["min"])
        elif kind in TOP:
            step_keep, why = top_fraction(table, TOP[kind], step["fraction"], step_facts, ids, rows)
        elif kind == "dedup":
            step_keep, why = dedup(step.get("side", "image"), step_facts, facts["keys"], ids, rows)
        else:
            raise ValueError(f"unknown policy step {kind!r}")
        dropped = np.flatnonzero(keep & ~step_keep)
        if len(dropped):
            reasons = reasons.scatter(dropped, pl.Series(why(dropped), dtype=pl.String))
        keep &= step_keep
    return pl.DataFrame({"key": table["key"], "keep": keep, "weight": np.where(keep, weight, 0.0),
                         "reason": reasons}, schema=DECISION)


DECISION = {"key": pl.String, "keep": pl.Boolean, "weight": pl.Float32, "reason": pl.String}


def decisions(parts: list[Part], steps: list[dict], facts: dict, columns: list[str] = ()) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Each part's scores (the steps' columns and `columns`) and its decisions, a part at a time."""
    for i, part in enumerate(parts):
        table = part(sorted({*policy_columns(steps), *columns})).collect(engine="streaming")
        yield table, decide(table, steps, facts, i)


def apply_policy(table: pl.DataFrame, steps: list[dict], neighbours: pl.LazyFrame | None = None) -> pl.DataFrame:
    """The decisions of a whole scores table in memory, as one part.

    A dedup step reads its neighbour lists from `neighbours` (the table's rows, in order) when given,
    so the table itself need not hold them."""
    whole = table.lazy() if neighbours is None else neighbours
    facts = global_facts([lambda columns: whole.select(columns)], steps, TableKeys(table["key"]))
    return decide(table, steps, facts, 0)


def policy_columns(steps: list[dict]) -> list[str]:
    """The scalar columns of the scores table the steps read (dedup also reads its side's neighbour lists)."""
    columns = {"key", "status", "error"}
    for step in steps:
        columns |= {"clean_prob": {"clean_prob"}, "cosine_top": {"cosine"}, "dn_top": {"dn_score"},
                    "dedup": {"clean_prob"}, "reweight": {step.get("by", "clean_prob")}}.get(step["kind"], set())
    return sorted(columns)
