"""Selection policies on a hand-made scores table whose answers are known."""

import polars as pl
import pytest

from curate.policies import TableKeys, apply_policy, global_facts


@pytest.fixture
def table():
    # five scored pairs and one failure; a, b are near-duplicate images, d, e near-duplicate captions
    return pl.DataFrame({
        "key": ["a", "b", "c", "d", "e", "f"],
        "status": ["scored"] * 5 + ["failed"],
        "error": [None] * 5 + ["empty caption"],
        "clean_prob": [0.9, 0.2, 0.6, 0.95, 0.4, None],
        "cosine": [0.30, 0.10, 0.25, 0.35, 0.20, None],
        "dn_score": [0.10, 0.05, 0.20, 0.15, 0.00, None],
        "image_nn_keys": [["b", "c"], ["a", "c"], ["a", "b"], ["e", "c"], ["d", "c"], None],
        "image_nn_sims": [[0.99, 0.5], [0.99, 0.4], [0.5, 0.4], [0.3, 0.2], [0.3, 0.2], None],
        "text_nn_keys": [["c", "b"], ["c", "a"], ["a", "b"], ["e", "a"], ["d", "a"], None],
        "text_nn_sims": [[0.5, 0.4], [0.5, 0.4], [0.5, 0.5], [0.995, 0.3], [0.995, 0.3], None],
    }, schema_overrides={"clean_prob": pl.Float32, "cosine": pl.Float32, "dn_score": pl.Float32})


def clusters_of(table, side, min_sim, neighbours=None):
    """The cluster labels a dedup step finds, over `neighbours` (the table's rows in order) or the table."""
    whole = table.lazy() if neighbours is None else neighbours
    step = {"kind": "dedup", "side": side, "min_sim": min_sim}
    return global_facts([lambda columns: whole.select(columns)], [step], TableKeys(table["key"]))["steps"][0]["clusters"]


def kept(result):
    return result.filter(pl.col("keep"))["key"].to_list()


def test_clean_prob_threshold(table):
    result = apply_policy(table, [{"kind": "clean_prob", "min": 0.5}])
    assert kept(result) == ["a", "c", "d"]
    reasons = dict(zip(result["key"], result["reason"]))
    assert reasons["b"] == "clean_prob 0.200 < 0.5" and reasons["f"] == "not scored: empty caption"


def test_top_fraction_by_cosine_and_dn(table):
    assert kept(apply_policy(table, [{"kind": "cosine_top", "fraction": 0.6}])) == ["a", "c", "d"]  # 3 of 5 scored
    assert kept(apply_policy(table, [{"kind": "dn_top", "fraction": 0.4}])) == ["c", "d"]


def test_dedup_keeps_the_cleanest_of_each_cluster(table):
    clusters = clusters_of(table, "image", 0.98)
    assert clusters[0] == clusters[1] and len(set(clusters[2:5])) == 3
    assert kept(apply_policy(table, [{"kind": "dedup", "side": "image", "min_sim": 0.98}])) == ["a", "c", "d", "e"]
    text = apply_policy(table, [{"kind": "dedup", "side": "text", "min_sim": 0.99}])
    assert kept(text) == ["a", "b", "c", "d"]
    assert dict(zip(text["key"], text["reason"]))["e"] == "near-duplicate (text) of d"


def test_steps_compose_and_reweighting_keeps_everything(table):
    both = apply_policy(table, [{"kind": "clean_prob", "min": 0.5}, {"kind": "dedup", "side": "text", "min_sim": 0.99}])
    assert kept(both) == ["a", "c", "d"]
    weighted = apply_policy(table, [{"kind": "reweight", "by": "clean_prob"}])
    assert kept(weighted) == ["a", "b", "c", "d", "e"]
    assert weighted["weight"].to_list()[:5] == pytest.approx([0.9, 0.2, 0.6, 0.95, 0.4])
    assert weighted["weight"][5] == 0.0


def test_a_policy_that_keeps_nothing(table):
    result = apply_policy(table, [{"kind": "clean_prob", "min": 0.99}])
    assert not result["keep"].any() and result["reason"].null_count() == 0


def test_rows_in_any_order_get_the_same_decisions(table):
    # ties are broken by key, and a neighbour is found by its key wherever its row is
    steps = [{"kind": "dedup", "side": "image", "min_sim": 0.98}, {"kind": "cosine_top", "fraction": 0.6}]
    forward = apply_policy(table, steps)
    assert apply_policy(table.reverse(), steps).reverse().equals(forward) and not forward["keep"].all()
