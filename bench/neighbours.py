"""Neighbour benchmark: exact blocked top-k against a faiss IVF + SQ8 index, on synthetic clustered embeddings.

    .venv/bin/python bench/neighbours.py [--sizes 100000 1000000] [--dim 512] [--k 16] [--queries 1000] [--seed 0]

Per base size n: L2-normalised float32 embeddings around sqrt(n) gaussian centres (made in chunks);
`queries` of its rows, chosen at random, search the whole base with their own row excluded. Exact is
timed on those queries and extrapolated to all-vs-all (time x n / queries); so is the index search,
after building the index (auto: IVF{nlist},SQ8; train + add, timed; nprobe 32). Recall@k is the index's against exact on the same queries.
Peak RSS is the kernel's resident high-water mark over the size's run (reset first by writing 5 to
/proc/self/clear_refs), base included. It prints; it asserts nothing.

--by-shard: the score stage's build instead (pipelines.score.build_shard_index, factory auto, shards of
10,000 rows made on the fly as if read from disk, so no base is ever held): build time, peak RSS of the
build, and the recall@k it reports against exact on its own seeded queries. Run one size per process
for a clean peak: `bench/neighbours.py --by-shard --sizes 200000`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curate.neighbours import auto_factory, build_index, exact_topk, index_topk, recall_at_k
from pipelines.score import build_shard_index


def clustered(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """n unit vectors around sqrt(n) centres; noise norm ~ centre norm, so clusters overlap a little."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, round(n ** 0.5)), dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for j in range(0, n, chunk):  # no n x dim float64 temporaries
        rows = min(chunk, n - j)
        x[j:j + rows] = centres[rng.integers(0, len(centres), rows)] + rng.standard_normal((rows, dim), np.float32)
        x[j:j + rows] /= np.linalg.norm(x[j:j + rows], axis=1, keepdims=True)
    return x


def by_shard(n: int, dim: int, k: int, seed: int, shard: int = 10_000) -> None:
    """Peak RSS and time of build_shard_index over n clustered rows in shards made on the fly."""
    centres = np.random.default_rng(seed).standard_normal((max(1, round(n ** 0.5)), dim)).astype(np.float32)

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        start = int(name)
        rng = np.random.default_rng([seed, start])
        rows = min(shard, n - start)
        x = centres[rng.integers(0, len(centres), rows)] + rng.standard_normal((rows, dim), np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.arange(start, start + rows, dtype=np.int64)

    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        recall, seconds = timed(build_shard_index, [str(s) for s in range(0, n, shard)], read, f"{tmp}/x.faiss",
                                auto_factory(n), seed, k=k)
        size = Path(f"{tmp}/x.faiss").stat().st_size
    print(f"n {n}, d {dim}, {auto_factory(n)}: build {seconds:.1f} s, index file {size / 2**20:.0f} MiB, "
          f"RSS before {before / 1024:.0f} MiB, peak {status_kib('VmHWM') / 1024:.0f} MiB; recall@{recall['k']} "
          f"{recall['recall']:.4f} on {recall['queries']} queries (nprobe 32)")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def timed(fn, *args, **kwargs):
    tick = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by-shard", action="store_true", help="the score stage's shard-by-shard build")
    args = parser.parse_args()
    if args.by_shard:
        for n in args.sizes:
            by_shard(n, args.dim, args.k, args.seed)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, d = {args.dim}, k = {args.k}, "
          f"{args.queries} queries per size; all-vs-all = query time x n / queries")
    print(f"{'n':>9} {'exact s':>8} {'exact all h':>12} {'nlist':>6} {'build s':>8} {'index s':>8} {'index all h':>12} "
          f"{'recall@k':>9} {'peak RSS MiB':>13}")
    for n in args.sizes:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so each size gets its own peak
        base = clustered(n, args.dim, args.seed)
        qids = np.sort(np.random.default_rng(args.seed + 1).choice(n, min(args.queries, n), replace=False))
        queries = base[qids]
        (_, true_ids), exact_s = timed(exact_topk, queries, base, args.k, query_ids=qids)
        index, build_s = timed(build_index, base, seed=args.seed)
        (_, ids), search_s = timed(index_topk, index, queries, args.k, query_ids=qids)
        scale = n / len(qids) / 3600
        print(f"{n:>9} {exact_s:>8.2f} {exact_s * scale:>12.2f} {faiss.extract_index_ivf(index).nlist:>6} {build_s:>8.1f} {search_s:>8.3f} {search_s * scale:>12.3f} "
              f"{recall_at_k(ids, true_ids):>9.4f} {status_kib('VmHWM') / 1024:>13.0f}")
        del base, queries, index


if __name__ == "__main__":
    main()
