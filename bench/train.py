"""Train-stage benchmark: `softcurate train` against `python -m open_clip_train.main`, same everything.

Both train the tiny ViT (softcurate-tiny) with the CLIP loss on the same demo shards, batch size,
data workers and torch threads, fp32 on the CPU, resampled shards. Throughput is the median of the
per-step samples/s each tool logs after a warm-up, plus the whole command's wall time. The two
tools alternate for `--rounds` rounds.

    .venv/bin/python bench/train.py [--steps 60] [--batch-size 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import load_config  # noqa: E402
from pipelines.shard import run_shard  # noqa: E402
from pipelines.world import serving  # noqa: E402

BIN = Path(sys.executable).parent
WARMUP = 10


def make_shards(tmp: Path) -> str:
    config = load_config(None, [f"root={tmp}", f"world.dir={tmp}/world", "world.n_train=4000", "world.n_val=2",
                                "world.n_test=2", 'world.failing_urls={"http_404": 0, "http_500": 0, "timeout": 0, '
                                '"truncated": 0, "html": 0}', "shard.samples_per_shard=1000", "shard.image_size=64",
                                "shard.allow_private_urls=true"])
    with serving(config) as served:
        run_shard(served)
    return f"{tmp}/shards/{{00000..00003}}.tar"


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - start


def softcurate(shards: str, out: Path, args, env) -> tuple[float, float]:
    seconds = run([str(BIN / "softcurate"), "train", "--shards", shards, "--root", str(out), "--name", "bench",
                   "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--threads", str(args.threads), "--lr", "1e-3", "--warmup-steps", "5", "--log-every", "1",
                   "--checkpoint-every", "100000", "--precision", "fp32", "--device", "cpu"], env)
    rows = [json.loads(line) for line in (out / "runs" / "bench" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows[WARMUP:] if "samples_per_s" in r), seconds


def open_clip_train(shards: str, out: Path, args, env) -> tuple[float, float]:
    import train.models

    model_dir = out / "tiny"
    model_dir.mkdir(parents=True)
    model_cfg = json.loads((train.models.CONFIG_DIR / "softcurate-tiny.json").read_text())
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    seconds = run([sys.executable, "-m", "open_clip_train.main", "--train-data", shards, "--dataset-type", "webdataset",
                   "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch_size),
                   "--model", f"local-dir:{model_dir}", "--batch-size", str(args.batch_size), "--epochs", "1",
                   "--workers", str(args.workers), "--lr", "1e-3", "--warmup", "5", "--logs", str(out / "logs"),
                   "--name", "bench", "--report-to", "", "--save-frequency", "0", "--device", "cpu",
                   "--precision", "fp32", "--log-every-n-steps", "1"], env)
    log = (out / "logs" / "bench" / "out.log").read_text()
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", log)]
    return statistics.median(rates[WARMUP:]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        shards = make_shards(tmp)
        results: dict[str, list[tuple[float, float]]] = {"softcurate": [], "open_clip_train": []}
        for r in range(args.rounds):
            for name, fn in (("softcurate", softcurate), ("open_clip_train", open_clip_train)):
                out = tmp / f"{name}{r}"
                rate, seconds = fn(shards, out, args, env)
                results[name].append((rate, seconds))
                print(f"round {r + 1}: {name:<16} {rate:8.1f} samples/s (median step)  {seconds:6.1f} s wall", flush=True)
        sc = statistics.median(x[0] for x in results["softcurate"])
        oc = statistics.median(x[0] for x in results["open_clip_train"])
        sc_wall = statistics.median(x[1] for x in results["softcurate"])
        oc_wall = statistics.median(x[1] for x in results["open_clip_train"])
        print(f"\nsoftcurate-tiny, CLIP loss, {args.steps} steps x batch {args.batch_size}, {args.workers} workers, "
              f"{args.threads} threads, fp32 CPU")
        print(f"softcurate train     {sc:8.1f} samples/s   {sc_wall:6.1f} s wall")
        print(f"open_clip_train.main {oc:8.1f} samples/s   {oc_wall:6.1f} s wall")
        print(f"ratio                {sc / oc:8.2f}   (target >= 1.0)   wall ratio {oc_wall / sc_wall:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
