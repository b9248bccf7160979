"""Top-k intra-modal nearest neighbours by inner product (cosine on L2-normalised embeddings).

Two ways to the same output format, (sims float32 (n, k), ids int64 (n, k)):
  exact_topk   blocked torch matmul, exact: the reference (recall is measured against it).
  index_topk   a faiss index (build_index): "Flat" is exact, the default IVF + SQ8 approximate.

Every result is ordered by similarity descending, ties by smaller id, so it is byte-identical across
runs. Missing neighbours (fewer than k candidates) are padding: id -1, sim NaN, always last.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

PAD_ID = -1
CHUNK_ELEMENTS = 1 << 24  # one query block x base chunk similarity matrix: at most 64 MiB of float32


def _order(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (padding last, sim descending, id ascending), keep k, pad to k."""
    sims, ids = np.asarray(sims, np.float32), np.asarray(ids, np.int64)
    pad = ids < 0
    sims = np.where(pad, np.float32(np.nan), sims)
    order = np.lexsort((ids, -sims, pad), axis=-1)[:, :k]  # last key is the primary one
    sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
    if ids.shape[1] < k:
        n, short = ids.shape[0], k - ids.shape[1]
        sims = np.concatenate([sims, np.full((n, short), np.nan, np.float32)], 1)
        ids = np.concatenate([ids, np.full((n, short), PAD_ID, np.int64)], 1)
    return np.ascontiguousarray(sims), np.ascontiguousarray(ids)


def merge_topk(sims_a: np.ndarray, ids_a: np.ndarray, sims_b: np.ndarray, ids_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two top-k results over disjoint base chunks: the top-k over their union."""
    return _order(np.concatenate([sims_a, sims_b], 1), np.concatenate([ids_a, ids_b], 1), k)


def _chunk_topk(s: torch.Tensor, chunk_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one similarity block s (rows, cols) whose columns carry chunk_ids; -inf = excluded."""
    kk = min(k, s.shape[1])
    vals, idx = torch.topk(s, kk, dim=1)
    # topk picks among equal values arbitrarily: rows with more than kk values >= the kk-th are redone
    # by hand, taking the tied ones by smaller id (rare on real data; exact ties need duplicate rows).
    kth = vals.min(dim=1).values
    tied = ((s >= kth[:, None]).sum(1) > kk).nonzero().flatten().tolist()
    vals, idx = vals.numpy(), idx.numpy()
    for r in tied:
        cand = (s[r] >= kth[r]).nonzero().flatten().numpy()
        row = s[r, cand].numpy()
        pick = cand[np.lexsort((chunk_ids[cand], -row))[:kk]]
        vals[r], idx[r] = s[r, pick].numpy(), pick
    ids = chunk_ids[idx]
    ids[np.isneginf(vals)] = PAD_ID  # excluded self hits that still made the cut: padding
    return _order(vals, ids, k)


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, *, query_ids: np.ndarray | None = None,
               base_ids: np.ndarray | None = None, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of base for each query by inner product, in float32, excluding the base row whose id is the query's."""
    n, m = len(queries), len(base)
    base_ids = np.arange(m, dtype=np.int64) if base_ids is None else np.asarray(base_ids, np.int64)
    qids = None if query_ids is None else torch.from_numpy(np.asarray(query_ids, np.int64))
    sims = np.full((n, k), np.nan, np.float32)
    ids = np.full((n, k), PAD_ID, np.int64)
    cols = max(1, CHUNK_ELEMENTS // block)  # base rows per matmul, so block x cols stays bounded
    for i in range(0, n, block):
        q = torch.from_numpy(np.ascontiguousarray(queries[i:i + block])).float()
        best = (sims[i:i + block], ids[i:i + block])
        for j in range(0, m, cols):
            b = torch.from_numpy(np.ascontiguousarray(base[j:j + cols])).float()  # per chunk: no float32 copy of base
            s = q @ b.T
            chunk_ids = base_ids[j:j + cols]
            if qids is not None:
                s.masked_fill_(qids[i:i + block, None] == torch.from_numpy(chunk_ids)[None, :], -math.inf)
            best = merge_topk(*best, *_chunk_topk(s, chunk_ids, k), k)
        sims[i:i + block], ids[i:i + block] = best
    return sims, ids


def _ivf(index: faiss.Index):
    """The IVF part of an index, or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def auto_factory(n: int) -> str:
    """faiss's rule of thumb: ~4 sqrt(n) lists, and >= 39 training points per list; SQ8 codes (one byte a dimension)."""
    return f"IVF{min(max(1, round(4 * math.sqrt(n))), max(1, n // 39))},SQ8"


def train_index(sample: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """An empty inner-product index trained on sample (n, d), ready for add_with_ids; "Flat" needs no training."""
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed  # k-means seed, so a rebuild gives the same lists
    elif not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)  # only IVF indexes take ids themselves
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def add(index: faiss.Index, base: np.ndarray, ids: np.ndarray, step: int = 65536) -> None:
    """Add base under ids, in chunks: a float16 or float64 base is never copied whole to float32."""
    for j in range(0, len(base), step):
        index.add_with_ids(np.ascontiguousarray(base[j:j + step], dtype=np.float32), np.asarray(ids[j:j + step], np.int64))


def build_index(base: np.ndarray, ids: np.ndarray | None = None, factory: str = "auto", seed: int = 0,
                train_size: int = 100_000) -> faiss.Index:
    """A trained faiss inner-product index holding base under ids (default arange), all in one go."""
    n = len(base)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    factory = auto_factory(n) if factory == "auto" else factory
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False))
    index = train_index(base[rows], factory, seed)
    add(index, base, ids)
    return index


def index_topk(index: faiss.Index, queries: np.ndarray, k: int, *, query_ids: np.ndarray | None = None,
               nprobe: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k from a faiss index, the query's own id excluded; same format and order as exact_topk."""
    params = faiss.SearchParametersIVF(nprobe=nprobe) if _ivf(index) is not None else None
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1, params=params)
    if query_ids is not None:
        ids[ids == np.asarray(query_ids, np.int64)[:, None]] = PAD_ID  # self hit -> padding, sorts last
    return _order(sims, ids, k)  # no self hit: the (k+1)-th is cut


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over queries of |found & true| / (true neighbours in the row, k unless padded); rows with none skipped."""
    hits, sizes = [], []
    for found, true in zip(found_ids, true_ids):
        true = true[true >= 0]
        if len(true):
            hits.append(np.isin(true, found).sum())
            sizes.append(len(true))
    return float(np.mean(np.array(hits) / np.array(sizes))) if sizes else float("nan")


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def merge_ondisk(index: faiss.Index, parts: list[str], ivfdata: str) -> None:
    """Move the inverted lists of the part index files into the empty trained index, stored in the file ivfdata
    that the index then maps. faiss.contrib.ondisk.merge_ondisk, but each part is kept open until the merge is
    done and then closed: the contrib version disowns the parts' lists, which leaves their files mapped."""
    loaded = [faiss.read_index(part, faiss.IO_FLAG_MMAP) for part in parts]  # mapped, not read into memory
    ivf = faiss.extract_index_ivf(index)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    sources = faiss.InvertedListsPtrVector()
    for part in loaded:
        sources.push_back(faiss.extract_index_ivf(part).invlists)
    index.ntotal = ivf.ntotal = invlists.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(invlists, True)  # the index owns them now
    invlists.this.disown()
    del sources, loaded


def write_index(index: faiss.Index, f) -> None:
    """serialize_index's bytes into the binary file object f, streamed: no second copy of the index in memory."""
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
