"""Benchmark: how fast the demo world is generated (train images/s at 64x64, one process).

Run: .venv/bin/python bench/world.py [--sizes 4000 20000] [--image-size 64] [--kind patterns]
Prints figures only; the world is written to a temporary directory and removed. End to end includes
the disk (one file per image) and the truth table; "compute only" is drawing + JPEG + caption alone.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time

import numpy as np

from pipelines.config import WorldConfig
from pipelines.world import TRAIN, build_world, jpeg
from pipelines.worlds import generator


def bench(cfg: WorldConfig, parent: str | None) -> dict:
    out = tempfile.mkdtemp(prefix="world-bench-", dir=parent)
    try:
        started = time.perf_counter()
        build_world(cfg, out, seed=0)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        build_world(cfg, out, seed=0)  # the idempotent re-run
        rerun = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    images = cfg.n_train + cfg.n_val + cfg.n_test
    return {"n_train": cfg.n_train, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "rerun_ms": rerun * 1000, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compute_only(n: int, cfg: WorldConfig) -> float:
    """Items/s for scene + drawing + JPEG + caption in memory: the rate without the disk."""
    gen = generator(cfg.kind)
    started = time.perf_counter()
    for i in range(n):
        scene = gen.make_scene(0, TRAIN, i, cfg)
        jpeg(gen.render(scene, cfg.image_size))
        gen.make_caption(scene["objects"], np.random.default_rng([0, TRAIN, i, 1]), cfg.partial_caption)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 20000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--kind", default="shapes", help="the world's generator")
    parser.add_argument("--eval", type=int, default=0, help="n_val = n_test (0: train split only)")
    parser.add_argument("--dir", default=None, help="where to write the temporary worlds (default: the system temp)")
    args = parser.parse_args()
    # One-time imports (torch, via webdataset) stay out of the timings.
    import pandas  # noqa: F401
    import webdataset  # noqa: F401
    print(f"demo world generation ({args.kind}), {args.image_size}x{args.image_size}, one process")
    print(f"{'n_train':>8} {'images':>8} {'seconds':>8} {'images/s':>9} {'re-run ms':>10} {'peak RSS MB':>12}")
    for n in args.sizes:
        cfg = WorldConfig(kind=args.kind, n_train=n, n_val=args.eval, n_test=args.eval, image_size=args.image_size)
        r = bench(cfg, args.dir)
        print(f"{r['n_train']:>8} {r['images']:>8} {r['seconds']:>8.2f} {r['images_per_s']:>9.0f} "
              f"{r['rerun_ms']:>10.1f} {r['peak_rss_mb']:>12.0f}", flush=True)
    print(f"compute only (no disk, no noise, no parquet): {compute_only(4000, WorldConfig(kind=args.kind, image_size=args.image_size)):.0f} images/s")


if __name__ == "__main__":
    main()
