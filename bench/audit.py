"""Audit and curate benchmark: `run_audit` and `run_curate` on synthetic scores of 100k and 1M pairs,
and the export throughput on the demo shards.

The synthetic dataset has what the two stages read: shards/NNNNN.parquet (key, url, caption,
status) and shards/_summary.json, scores/NNNNN.parquet (10,000 rows each, the score stage's schema
without embeddings: 70% clean pairs, 30% noisy, 16 neighbours each) and scores/_summary.json. There
are no tars, so the galleries show placeholders (thumbnails cost a read of the shards holding
them: a few shards, independent of the data size).

    .venv/bin/python bench/audit.py [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.audit import run_audit  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.curate import run_curate  # noqa: E402

PER_SHARD = 10_000
K = 16


def synthetic(root: Path, n: int, seed: int = 0) -> None:
    """shards/ and scores/ tables of n pairs, 10,000 a file, built column-wise (4M pairs in minutes)."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    (root / "scores").mkdir()
    names = []
    for shard, start in enumerate(range(0, n, PER_SHARD)):
        m = min(PER_SHARD, n - start)
        ids = shard * 10_000 + np.arange(m)
        keys = pl.Series("key", ids).cast(pl.String).str.zfill(9)
        noisy = rng.random(m) < 0.3
        cosine = np.where(noisy, rng.normal(0.18, 0.06, m), rng.normal(0.31, 0.04, m)).astype(np.float32)
        loss = np.where(noisy, rng.normal(7.5, 1.2, m), rng.normal(4.5, 0.6, m)).astype(np.float32)
        clean_prob = (1 / (1 + np.exp(2.5 * (loss - 6.0)))).astype(np.float32)
        nn_keys = (pl.Series(shard * 10_000 + rng.integers(0, m, m * K)).cast(pl.String).str.zfill(9)
                   .reshape((m, K)).cast(pl.List(pl.String)))
        sims = pl.Series(np.sort(rng.uniform(0.6, 1.0, (m, K)).astype(np.float32), axis=1)[:, ::-1].ravel()
                         ).reshape((m, K)).cast(pl.List(pl.Float32))
        domains = rng.choice(["img.example.com", "cdn.example.org", "photos.example.net"], m)
        pl.DataFrame({"key": keys, "domain": domains}).select(
            "key", url=pl.format("http://{}/{}.jpg", "domain", "key"), caption=pl.format("caption {}", "key"),
            status=pl.lit("success")).write_parquet(root / "shards" / f"{shard:05d}.parquet")
        pl.DataFrame({"key": keys, "row": np.arange(start, start + m), "status": pl.repeat("scored", m, eager=True),
                      "error": pl.repeat(None, m, dtype=pl.String, eager=True), "cosine": cosine,
                      "dn_score": cosine - np.float32(0.1), "loss": loss, "clean_prob": clean_prob,
                      "image_nn_keys": nn_keys, "image_nn_sims": sims, "text_nn_keys": nn_keys, "text_nn_sims": sims}
                     ).write_parquet(root / "scores" / f"{shard:05d}.parquet")
        names.append(f"{shard:05d}.tar")
    (root / "shards" / "_summary.json").write_text(json.dumps({"shards": names, "counts": {
        "input_rows": n, "rejected": 0, "failures": 0, "successes": n}, "failures_by_reason": []}))
    (root / "scores" / "_summary.json").write_text(json.dumps({
        "teacher": {"model": "synthetic", "checkpoints": ["none"], "logit_scale": [50.0], "tau_s": 0.02},
        "mixture": {"weights": [0.7, 0.3], "means": [4.5, 7.5], "variances": [0.36, 1.44]},
        "noise": {"temperature_indicator": 0.1, "noisy_component_weight": 0.3}}))


def timed(fn, *args, **kw) -> float:
    start = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - start


STAGES = {"audit": "from pipelines.audit import run_audit as run; overrides = []",
          "curate": "from pipelines.curate import run_curate as run; overrides = []",
          "curate + dedup": "from pipelines.curate import run_curate as run; overrides = ['curate.policy=["
                            "{kind: clean_prob, min: 0.5}, {kind: dedup, side: image, min_sim: 0.99}]']"}


def memory(n: int, trees: list[str]) -> None:
    """Each stage alone in a new interpreter: its peak RSS (the process's own high-water mark), the
    high-water mark after the imports alone, and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        synthetic(Path(tmp), n)
        for stage, imports in STAGES.items():
            for tree in trees:
                code = (f"import resource, sys, time; {imports}\nfrom pipelines.config import load_config\n"
                        "floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
                        f"start = time.perf_counter(); run(load_config(None, ['root={tmp}', *overrides]))\n"
                        "print(floor, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONPATH": tree})
                floor, seconds, peak = map(float, out.stdout.split()[-3:])
                print(f"{n:>9} pairs  {stage:<15} {seconds:>6.1f} s  peak RSS {peak:>7.0f} MiB "
                      f"(imports {floor:.0f} MiB)  {tree}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--config", default="configs/demo.yaml", help="for the export: its demo shards and scores")
    parser.add_argument("--memory", type=int, metavar="N",
                        help="instead: peak RSS of each stage in a fresh process on N synthetic pairs")
    parser.add_argument("--code", nargs="+", default=[str(Path(__file__).resolve().parents[1])],
                        help="with --memory: the source trees to run the stages from, in turn (e.g. another checkout)")
    args = parser.parse_args()
    if args.memory:
        return memory(args.memory, args.code)
    print(f"{'pairs':>9} {'audit s':>8} {'curate s':>9} {'dedup curate s':>15} {'peak RSS MiB':>13}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            synthetic(root, n)
            config = load_config(None, [f"root={root}"])
            audit_s = timed(run_audit, config)
            curate_s = timed(run_curate, config, export=False)
            dedup = load_config(None, [f"root={root}", "curate.policy=[{kind: clean_prob, min: 0.5}, "
                                                        "{kind: dedup, side: image, min_sim: 0.99}]"])
            dedup_s = timed(run_curate, dedup, export=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:>9} {audit_s:>8.1f} {curate_s:>9.1f} {dedup_s:>15.1f} {peak:>13.0f}   (peak is the process so far)")
    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        export = load_config(args.config, [f"curate.output={tmp}"])
        start = time.perf_counter()
        summary = run_curate(export, export=True)
        seconds = time.perf_counter() - start
    written = summary["export"]["shards"]["samples"] + summary["export"]["unpaired_images"]["samples"] + \
        summary["export"]["unpaired_texts"]["samples"]
    print(f"\nexport of {config.root}: {summary['pairs']} pairs read, {written} samples written "
          f"(curated + unpaired pools) in {seconds:.1f} s: {summary['pairs'] / seconds:.0f} pairs/s")


if __name__ == "__main__":
    main()
