"""Scaling benchmark: shard and score with 1 and 2 Dask workers (strong scaling), the scheduler's
overhead per task, and from the measured per-sample costs an estimate for CC12M.

Strong scaling: the same input (a demo world of --n pairs, served on loopback, in --shards shards)
is sharded and scored on a LocalCluster of 1 worker and of 2 single-threaded workers; the ratio
of the stage's wall time is the speed-up. Scheduler overhead: the median round trip of a trivial
task submitted one at a time, and the time per task of --tasks trivial tasks submitted at once.

    .venv/bin/python bench/scale.py [--n 2000] [--shards 8] [--tasks 1000] [--gpus 8] [--gpu-pairs-per-s 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curate.teacher import fast_path, prepare  # noqa: E402
from pipelines.config import WorldConfig, load_config  # noqa: E402
from pipelines.distributor import dask_client  # noqa: E402
from pipelines.io import read_shard  # noqa: E402
from pipelines.score import run_score  # noqa: E402
from pipelines.shard import run_shard  # noqa: E402
from pipelines.world import build_world, serving, write_url_list  # noqa: E402
from pipelines.world_server import serve_world  # noqa: E402
from train.models import create_model, save_checkpoint  # noqa: E402

CC12M = 12_423_374  # pairs in CC12M's url list


def noop(i: int) -> int:
    return i


def scheduler_overhead(tasks: int) -> tuple[float, float]:
    """(median round trip of one trivial task in us, time per task of `tasks` submitted at once in us)."""
    with dask_client(None, 1) as client:
        client.submit(noop, -1, pure=False).result()  # warm-up: the worker has the function
        trips = []
        for i in range(tasks):
            start = time.perf_counter()
            client.submit(noop, i, pure=False).result()
            trips.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.gather(client.map(noop, range(tasks), pure=False))
        batch = (time.perf_counter() - start) / tasks
    return statistics.median(trips) * 1e6, batch * 1e6


def decode_seconds(shard: str, model) -> float:
    """CPU seconds per sample of the score stage's decode (jpeg to the model's input tensor)."""
    _, _, preprocess, _ = model
    fast = fast_path(model[0])
    samples = read_shard(shard)
    start = time.process_time()
    for sample in samples:
        prepare(sample, preprocess, fast)
    return (time.process_time() - start) / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="pairs in the demo world")
    parser.add_argument("--shards", type=int, default=8, help="shards the pairs are split into (tasks per phase)")
    parser.add_argument("--tasks", type=int, default=1000, help="trivial tasks for the scheduler overhead")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the CC12M estimate")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores beside each GPU (decode, download)")
    parser.add_argument("--gpu-pairs-per-s", type=float, default=5000.0,
                        help="ASSUMED teacher forward rate of one GPU (ViT-B-32, bf16); not measured here")
    args = parser.parse_args()
    tmp_dir = tempfile.TemporaryDirectory(prefix="softcurate-scale-")
    tmp = Path(tmp_dir.name)
    world = tmp / "world"
    build_world(WorldConfig(n_train=args.n, n_val=0, n_test=0, failing_urls={"http_404": 0, "http_500": 0, "timeout": 0,
                                                                             "truncated": 0, "html": 0}), str(world), 0)
    teacher = tmp / "teacher.pt"
    model = create_model("softcurate-tiny")
    save_checkpoint(model[0], teacher)
    per_shard = -(-args.n // args.shards)
    rows = {}
    with serve_world(str(world)) as base_url:
        tsv, _ = write_url_list(str(world), base_url)
        for workers in (1, 2):
            root = tmp / f"w{workers}"
            config = load_config(None, [f"root={root}", f"shard.input.path={tsv}", "shard.input.format=cc12m",
                                        "shard.allow_private_urls=true", f"shard.processes={workers}", "shard.threads=16",
                                        f"shard.samples_per_shard={per_shard}", "shard.image_size=64",
                                        f"score.processes={workers}", "score.batch_size=128", "score.threads=1",
                                        f"score.checkpoints=['{teacher}']", "score.model=softcurate-tiny"])
            start = time.perf_counter()
            with dask_client(None, workers):  # what the stage spends starting its cluster, to take it out of the scaling
                pass
            cluster_s = time.perf_counter() - start
            start = time.perf_counter()
            with serving(config) as served:
                shard = run_shard(served)
            shard_seconds = time.perf_counter() - start
            start = time.perf_counter()
            score = run_score(config)
            score_seconds = time.perf_counter() - start
            rows[workers] = {"shard": shard, "shard_s": shard_seconds, "score": score, "score_s": score_seconds,
                             "cluster_s": cluster_s}
    decode = decode_seconds(str(tmp / "w1" / "shards" / "00000.tar"), model)
    median_us, batch_us = scheduler_overhead(args.tasks)
    tmp_dir.cleanup()

    print(f"\n== strong scaling: {args.n} pairs in {args.shards} shards, LocalCluster of 1 and 2 single-threaded workers ==")
    print(f"{'workers':>7} {'cluster start s':>15} {'shard s':>8} {'images/s':>9} {'score s':>8} {'embed s':>8} "
          f"{'score-phase s':>13} {'pairs/s':>8}")
    for workers, r in rows.items():
        wall = r["score"]["seconds"]["wall"]
        print(f"{workers:>7} {r['cluster_s']:>15.1f} {r['shard_s']:>8.1f} {r['shard']['counts']['successes'] / r['shard_s']:>9.1f} "
              f"{r['score_s']:>8.1f} {wall['embed']:>8.1f} {wall['score']:>13.2f} {r['score']['counts']['samples'] / r['score_s']:>8.1f}")
    one, two = rows[1], rows[2]

    def tasks_wall(r):  # the stage's wall time without its cluster start: the part more workers can speed up
        return r["shard_s"] - r["cluster_s"], r["score"]["seconds"]["wall"]["embed"] + r["score"]["seconds"]["wall"]["score"]

    (shard1, score1), (shard2, score2) = tasks_wall(one), tasks_wall(two)
    print(f"speed-up 1 -> 2 workers (ideal 2x): end to end shard {one['shard_s'] / two['shard_s']:.2f}x, score "
          f"{one['score_s'] / two['score_s']:.2f}x; without the cluster start: shard {shard1 / shard2:.2f}x "
          f"({shard1:.1f} -> {shard2:.1f} s), score's task phases (embed + score) {score1 / score2:.2f}x "
          f"({score1:.1f} -> {score2:.1f} s)")
    print(f"\n== scheduler overhead (LocalCluster, 1 worker) ==\n"
          f"one trivial task at a time: median round trip {median_us:.0f} us over {args.tasks}; "
          f"{args.tasks} submitted at once: {batch_us:.0f} us per task")

    # Per-sample costs on this machine, from the 1-worker run (one core doing the work).
    shard_core_s = one["shard"]["shard_task_seconds"] / one["shard"]["counts"]["successes"]
    embed_core_s = one["score"]["seconds"]["tasks"]["embed"] / one["score"]["counts"]["samples"]
    score_core_s = one["score"]["seconds"]["tasks"]["score"] / one["score"]["counts"]["samples"]
    cores = args.gpus * args.cpus_per_gpu
    shard_h = CC12M * shard_core_s / cores / 3600
    decode_h = CC12M * decode / cores / 3600
    forward_h = CC12M / (args.gpus * args.gpu_pairs_per_s) / 3600
    score_h = CC12M * score_core_s / cores / 3600
    tasks = -(-CC12M // 10_000)
    print(f"\n== per-sample costs measured here (1 worker; 64 px images on loopback) ==\n"
          f"shard: {shard_core_s * 1e3:.2f} ms of task wall time per image (download with 16 threads + resize + write)\n"
          f"score: {embed_core_s * 1e3:.2f} ms per pair in the embed tasks (decode {decode * 1e3:.2f} ms of it, "
          f"the rest the tiny teacher and its loading), {score_core_s * 1e3:.3f} ms per pair in the score tasks")
    print(f"\n== CC12M ({CC12M:,} pairs) on {args.gpus} GPUs x {args.cpus_per_gpu} cores (an estimate, see how) ==\n"
          f"shard:  {shard_h:6.2f} h  = pairs x {shard_core_s * 1e3:.2f} ms / {cores} tasks at once (one per core); a floor: real images are"
          f" larger than 64 px\n"
          f"        (resize cost grows with pixels) and the web is slower than loopback (the threads hide latency,"
          f" not bandwidth)\n"
          f"embed:  {max(decode_h, forward_h):6.2f} h  = max(decode {decode_h:.2f} h = pairs x {decode * 1e3:.2f} ms / "
          f"{cores} cores, forward {forward_h:.2f} h = pairs / ({args.gpus} x {args.gpu_pairs_per_s:.0f} pairs/s ASSUMED))\n"
          f"score:  {score_h:6.2f} h  = pairs x {score_core_s * 1e3:.3f} ms / {cores} cores (posterior vs the 1023-pair bank,"
          f" neighbours; faiss IVF search at 12M not measured)\n"
          f"scheduler: {tasks} shard tasks of 10,000 per phase x {batch_us:.0f} us = {tasks * batch_us / 1e6:.2f} s:"
          f" negligible")


if __name__ == "__main__":
    main()
