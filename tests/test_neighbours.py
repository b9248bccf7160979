"""Nearest neighbours: exact_topk matches a brute-force argsort (self excluded, ties by smaller id), merging
chunk results equals searching the whole base, padding fills short rows, and the faiss index finds most
of the exact neighbours and survives a save/load; built shard by shard, an index equals the one-shot
one, and a build killed midway resumes to the same bytes."""

from __future__ import annotations

import numpy as np

from curate.neighbours import (
    add,
    build_index,
    deserialize_index,
    exact_topk,
    index_topk,
    merge_topk,
    recall_at_k,
    serialize_index,
    train_index,
)
from pipelines.score import RECALL_QUERIES, SAMPLE_SEEDS, TRAIN_SIZE, build_shard_index, sample_shards


def reference(queries, base, k, query_ids=None, base_ids=None):
    """Straight from the definition: float64 scores, full sort by (score desc, id asc), self dropped."""
    base_ids = np.arange(len(base)) if base_ids is None else base_ids
    scores = queries.astype(np.float64) @ base.astype(np.float64).T
    sims, ids = np.full((len(queries), k), np.nan, np.float32), np.full((len(queries), k), -1, np.int64)
    for r, row in enumerate(scores):
        keep = np.ones(len(base), bool) if query_ids is None else base_ids != query_ids[r]
        cand = np.flatnonzero(keep)
        top = cand[np.lexsort((base_ids[cand], -row[cand]))][:k]
        sims[r, :len(top)], ids[r, :len(top)] = row[top], base_ids[top]
    return sims, ids


def integer_case(seed=0, n=40, m=300, d=8):
    """Small integer vectors: dot products are exact in float32 whatever the summation order, and many tie;
    every third base row is repeated so duplicates tie exactly. Shuffled ids, queries drawn from the base."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(m, d)).astype(np.float32)
    base[1::3] = base[0::3][:len(base[1::3])]
    base_ids = rng.permutation(10 * m)[:m].astype(np.int64)
    rows = rng.choice(m, n, replace=False)
    return base[rows], base, base_ids[rows], base_ids


def test_exact_matches_reference_on_random_floats():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((500, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[:50]
    sims, ids = exact_topk(queries, base, 10, query_ids=np.arange(50), block=16)  # several query blocks
    ref_sims, ref_ids = reference(queries, base, 10, query_ids=np.arange(50))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    assert not (ids == np.arange(50)[:, None]).any()  # self excluded


def test_exact_ties_and_self_exclusion_match_reference():
    queries, base, qids, bids = integer_case()
    sims, ids = exact_topk(queries, base, 12, query_ids=qids, base_ids=bids, block=7)
    ref_sims, ref_ids = reference(queries, base, 12, query_ids=qids, base_ids=bids)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)
    # the case really has ties at the cut, where topk alone picks arbitrarily
    assert (sims[:, -1] == sims[:, -2]).any()
    again = exact_topk(queries, base, 12, query_ids=qids, base_ids=bids, block=40)
    assert sims.tobytes() == again[0].tobytes() and ids.tobytes() == again[1].tobytes()


def test_float16_input():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((400, 64)).astype(np.float16)
    sims, ids = exact_topk(base[:30], base, 8, query_ids=np.arange(30))
    ref_sims, ref_ids = reference(base[:30].astype(np.float32), base.astype(np.float32), 8, query_ids=np.arange(30))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-4)
    assert sims.dtype == np.float32


def test_merge_of_three_chunks_equals_whole():
    queries, base, qids, bids = integer_case(seed=3)
    k = 12
    whole = exact_topk(queries, base, k, query_ids=qids, base_ids=bids)
    parts = [exact_topk(queries, base[a:b], k, query_ids=qids, base_ids=bids[a:b]) for a, b in [(0, 70), (70, 190), (190, len(base))]]
    merged = merge_topk(*merge_topk(*parts[0], *parts[1], k), *parts[2], k)
    np.testing.assert_array_equal(merged[1], whole[1])
    np.testing.assert_array_equal(merged[0], whole[0])


def test_padding_when_base_smaller_than_k():
    base = np.eye(4, dtype=np.float32)
    sims, ids = exact_topk(base, base, 6, query_ids=np.arange(4))
    assert ids.shape == (4, 6)
    assert (ids[:, 3:] == -1).all() and np.isnan(sims[:, 3:]).all()  # 3 candidates once self is out
    np.testing.assert_array_equal(ids[0, :3], [1, 2, 3])  # all tie at 0: by id
    # padding sorts after real entries when merged, even after a negative similarity
    merged = merge_topk(sims, ids, np.full((4, 1), -5, np.float32), np.full((4, 1), 99, np.int64), 6)
    assert (merged[1][:, 3] == 99).all() and (merged[1][:, 4:] == -1).all()
    assert recall_at_k(ids, ids) == 1.0


def clustered(n, d, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_recall_and_serialization():
    base = clustered(20_000, 64, 200, seed=4)
    qids = np.random.default_rng(5).choice(len(base), 500, replace=False)
    _, true_ids = exact_topk(base[qids], base, 16, query_ids=qids)
    index = build_index(base, seed=0)
    sims, ids = index_topk(index, base[qids], 16, query_ids=qids)
    recall = recall_at_k(ids, true_ids)
    assert recall >= 0.9, recall
    assert not (ids == qids[:, None]).any()
    assert (np.diff(sims, axis=1) <= 0).all()  # ordered, like exact_topk
    assert recall_at_k(np.roll(ids, 1, axis=0), true_ids) < 0.1  # the measure can fail
    loaded = deserialize_index(serialize_index(index))
    assert loaded.ntotal == len(base)
    again = index_topk(loaded, base[qids], 16, query_ids=qids)
    assert sims.tobytes() == again[0].tobytes() and ids.tobytes() == again[1].tobytes()


# ---------------------------------------------------------------- built shard by shard (pipelines.score)
def shard_reader(base, bounds):
    """Shards named by their row range; read gives (embeddings, ids) as scored_embeddings does."""
    shards = [f"{a}:{b}" for a, b in zip(bounds[:-1], bounds[1:])]

    def read(shard):
        a, b = map(int, shard.split(":"))
        return base[a:b], np.arange(a, b, dtype=np.int64) * 7  # ids are not row numbers
    return shards, read


def test_exact_index_by_shard_has_the_bytes_of_the_one_shot_index(tmp_path):
    base = clustered(3000, 32, 20, seed=6).astype(np.float64)
    shards, read = shard_reader(base, [0, 700, 700, 2100, 3000])  # an empty shard too
    assert build_shard_index(shards, read, str(tmp_path / "x.faiss"), "Flat", seed=0) is None
    one_shot = build_index(base.astype(np.float32), np.arange(3000) * 7, factory="Flat")
    assert (tmp_path / "x.faiss").read_bytes() == serialize_index(one_shot)


def test_ivf_index_by_shard_equals_one_shot_on_the_same_sample(tmp_path, monkeypatch):
    import pipelines.score

    monkeypatch.setattr(pipelines.score, "PART_ROWS", 6000)  # two shards a part: three parts merged on disk
    base = clustered(20_000, 64, 200, seed=7)
    shards, read = shard_reader(base, [0, 3000, 5000, 12000, 15000, 20000])
    factory = "IVF64,SQ8"
    recall = build_shard_index(shards, read, str(tmp_path / "x.faiss"), factory, seed=3)
    by_shard = deserialize_index((tmp_path / "x.faiss").read_bytes())
    assert (tmp_path / "x.ivfdata").exists() and not (tmp_path / "x.parts").exists()
    assert by_shard.ntotal == len(base)
    sample = sample_shards(shards, read, {"train": (TRAIN_SIZE, 3 + SAMPLE_SEEDS["train"])})["train"]
    one_shot = train_index(sample[0], factory, seed=3)
    add(one_shot, base, np.arange(len(base)) * 7)
    # the same lists in the same order: every query finds the same neighbours at the same similarities
    queries = np.arange(0, 20_000, 37)
    for nprobe in (1, 8):
        a = index_topk(by_shard, base[queries], 16, query_ids=queries * 7, nprobe=nprobe)
        b = index_topk(one_shot, base[queries], 16, query_ids=queries * 7, nprobe=nprobe)
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    # the reported recall is the one measured here on the same queries
    queries = sample_shards(shards, read, {"recall": (RECALL_QUERIES, 3 + SAMPLE_SEEDS["recall"])})["recall"]
    _, true_ids = exact_topk(queries[0], base, 16, query_ids=queries[1], base_ids=np.arange(len(base)) * 7)
    _, ids = index_topk(by_shard, queries[0], 16, query_ids=queries[1])
    assert recall == {"k": 16, "queries": RECALL_QUERIES, "recall": round(recall_at_k(ids, true_ids), 4)}
    assert recall["recall"] >= 0.95, recall


KILLED_BUILD = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
import pipelines.score
from test_neighbours import clustered, shard_reader
from pipelines.score import build_shard_index
pipelines.score.PART_ROWS = 2000  # a part a shard
base = clustered(6000, 32, 40, seed=8)
shards, read = shard_reader(base, [0, 2000, 4000, 6000])
calls = []
def reading(shard):  # sampling reads the 3 shards, one more gives a shard's size, then a part each: die on the second part
    calls.append(shard)
    if len(calls) == 6 and {kill}:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(shard)
build_shard_index(shards, reading, sys.argv[1], "IVF16,SQ8", seed=0)
print(len(calls))
"""


def test_killed_build_resumes_to_the_uninterrupted_index(tmp_path):
    import os
    import subprocess
    import sys

    def run(path, kill):
        script = KILLED_BUILD.format(tests=os.path.dirname(__file__), kill=kill)
        return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)

    whole = tmp_path / "whole" / "image.faiss"
    done = run(whole, False)
    assert done.returncode == 0, done.stderr
    killed = tmp_path / "killed" / "image.faiss"
    assert run(killed, True).returncode == -9
    assert not killed.exists()  # nothing that looks complete
    assert (tmp_path / "killed" / "image.trained.faiss").exists()  # the checkpoints it resumes from
    assert sorted(os.listdir(tmp_path / "killed" / "image.parts")) == ["00000.faiss"]
    resumed = run(killed, False)
    assert resumed.returncode == 0, resumed.stderr
    assert int(resumed.stdout.split()[-1]) == int(done.stdout.split()[-1]) - 1  # the finished part is not rebuilt
    assert (tmp_path / "killed" / "image.ivfdata").read_bytes() == (tmp_path / "whole" / "image.ivfdata").read_bytes()
    queries = clustered(6000, 32, 40, seed=8)[::50]
    a = index_topk(deserialize_index(killed.read_bytes()), queries, 8)
    b = index_topk(deserialize_index(whole.read_bytes()), queries, 8)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
