"""Score-stage benchmark: `softcurate score` end to end against the bare teacher forward, and its memory.

Needs the demo's shards and teacher (`softcurate run configs/demo.yaml`). Prints
- pairs/s of the bare model forward on pre-decoded batches (same model, batch size, total threads);
- pairs/s of the score stage: end to end (Dask cluster start and teacher loading included) and in
  its embed phase, and the ratio of each to the bare forward;
- the wall time of each phase, and the time beyond embedding (globals + scoring + neighbours) as a share of it;
- peak memory of the whole process tree (driver + Dask workers) at 1x and Nx the data, the Nx data
  being the demo shards copied with fresh keys.

With --decode-workers (needs no demo): the teacher pass alone (embed_shard on one Dask worker, as the
score stage runs it) over 64 px world shards, once per number of decode processes; pairs/s of each and
its ratio to the first, and whether the embeddings are byte-identical; and the feed alone (the batches
decoded with no forward: what a GPU that embeds faster than the decode would get).

    .venv/bin/python bench/score.py [--scale 4]
    .venv/bin/python bench/score.py --decode-workers 1,2 [--pairs 4000] [--model softcurate-tiny] [--image-size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shard import timed  # noqa: E402
from curate.teacher import embed, fast_path, prepare, stack_images  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.io import read_shard  # noqa: E402
from train.models import create_model, save_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent


def bare_forward(shards: list[str], checkpoint: str, model_name: str, batch_size: int, threads: int) -> float:
    """Pairs/s of the teacher's forward alone, on batches decoded beforehand."""
    torch.set_num_threads(threads)
    model, _, preprocess, tokenizer = create_model(model_name, checkpoint)
    model.eval()
    fast = fast_path(model)
    decoded = [prepare(s, preprocess, fast) for shard in shards for s in read_shard(shard)]
    chunks = [decoded[i:i + batch_size] for i in range(0, len(decoded), batch_size)]
    batches = [(stack_images([d[0] for d in chunk], fast), tokenizer([d[1] for d in chunk])) for chunk in chunks]
    embed(model, *batches[0], torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    for images, texts in batches:
        embed(model, images, texts, torch.device("cpu"))
    return len(decoded) / (time.perf_counter() - start)


def replicate(root: Path, out: Path, times: int, limit: int | None = None, samples: int | None = None) -> None:
    """The demo shards (the first `limit`, their first `samples`) `times` over, each copy with its own keys."""
    shards = json.loads((root / "shards" / "_summary.json").read_text())["shards"][:limit]
    (out / "shards").mkdir(parents=True)
    names, n = [], 0
    for copy in range(times):
        for shard in shards:
            name = f"{n:05d}"
            with tarfile.open(root / "shards" / shard) as src, tarfile.open(out / "shards" / f"{name}.tar", "w") as dst:
                for member in src.getmembers():
                    key, ext = member.name.split(".", 1)
                    if samples is not None and int(key[5:]) >= samples:
                        continue
                    member.name = f"{name}{key[5:]}.{ext}"
                    dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
            names.append(f"{name}.tar")
            n += 1
    (out / "shards" / "_summary.json").write_text(json.dumps({"shards": names}))


def run(config: str, root: Path, output: Path, checkpoint: str, model: str) -> tuple[float, int, dict]:
    cmd = [str(BIN / "softcurate"), "score", config, "--root", str(root), "--output", str(output),
           "--checkpoints", checkpoint, "--model", model, "--overwrite"]
    seconds, peak = timed(cmd, output)
    return seconds, peak, json.loads((output / "_summary.json").read_text())


def feed(url: str, spec: dict, batch_size: int, workers: int) -> int:
    """On a worker: the shard's batches decoded as embed_shard gets them, with no forward (what a fast GPU would wait on)."""
    from pipelines.score_tasks import decoded, load_teachers

    samples = read_shard(url)
    batches = [list(enumerate(samples))[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    return sum(len(done["indices"]) for done in decoded(batches, load_teachers(spec), workers))


def decode_workers_bench(counts: list[int], pairs: int, model: str, batch_size: int, threads: int,
                         image_size: int = 64) -> None:
    """Pairs/s of the teacher pass with each number of decode processes, in one run on the same shards."""
    from pipelines.config import WorldConfig
    from pipelines.distributor import dask_client
    from pipelines.score_tasks import embed_shard
    from pipelines.world import write_split
    from pipelines.worlds import generator

    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    per_shard = 1000
    shards = [str(tmp / f"{n:05d}.tar") for n in range(1 + -(-pairs // per_shard))]  # the first: a warm-up
    for n, shard in enumerate(shards):
        write_split(generator("shapes"), shard, 0, n, per_shard, WorldConfig(image_size=image_size))
    save_checkpoint(create_model(model)[0], tmp / "teacher.pt")
    spec = {"model": model, "checkpoints": [str(tmp / "teacher.pt")], "sentence_teacher": None, "device": "cpu", "bf16": False}
    print(f"teacher pass: {model} (random weights), {len(shards) - 1} x {per_shard} pairs of {image_size} px, batch {batch_size}, "
          f"1 Dask worker x {threads} torch thread(s); {torch.get_num_threads()} cores")
    rates, feeds, outputs = [], [], []
    with dask_client(None, 1) as client:
        for workers in counts:
            def task(shard: str, out: str):
                return client.submit(embed_shard, shard, out, spec, batch_size, threads, workers, pure=False).result()

            task(shards[0], str(tmp / f"warm_{workers}.parquet"))  # teacher and decode processes started
            start = time.perf_counter()
            for n, shard in enumerate(shards[1:]):
                task(shard, str(tmp / f"embed_{workers}_{n}.parquet"))
            rates.append(per_shard * (len(shards) - 1) / (time.perf_counter() - start))
            start = time.perf_counter()
            for shard in shards[1:]:
                client.submit(feed, shard, spec, batch_size, workers, pure=False).result()
            feeds.append(per_shard * (len(shards) - 1) / (time.perf_counter() - start))
            outputs.append([(tmp / f"embed_{workers}_{n}.parquet").read_bytes() for n in range(len(shards) - 1)])
    tmp_dir.cleanup()
    print(f"{'decode workers':>14} {'pairs/s':>8} {'ratio':>6} {'feed p/s':>9} {'ratio':>6}   (feed: decoded, no forward)")
    for workers, rate, fed in zip(counts, rates, feeds):
        print(f"{workers:>14} {rate:>8.0f} {rate / rates[0]:>6.2f} {fed:>9.0f} {fed / feeds[0]:>6.2f}")
    print("embeddings byte-identical across settings:", all(o == outputs[0] for o in outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--scale", type=int, default=4, help="the larger run's data, as a multiple of the demo's")
    parser.add_argument("--model", default=None, help="another teacher architecture, randomly initialised "
                        "(e.g. ViT-B-32: a realistic forward cost); default: the demo's teacher")
    parser.add_argument("--shards", type=int, default=None, help="use only the first N demo shards")
    parser.add_argument("--samples", type=int, default=None, help="and only their first N samples")
    parser.add_argument("--decode-workers", default=None, metavar="N,M",
                        help="the teacher pass alone with each of these score.decode_workers (e.g. 1,2)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="--decode-workers: the shards' stored image size (above the teacher's, each is resized)")
    parser.add_argument("--pairs", type=int, default=4000, help="--decode-workers: pairs timed (plus a warm-up shard)")
    args = parser.parse_args()
    config = load_config(args.config)
    cfg = config.score
    if args.decode_workers:
        counts = [int(n) for n in args.decode_workers.split(",")]
        decode_workers_bench(counts, args.pairs, args.model or config.train.model, cfg.batch_size, cfg.threads,
                             args.image_size)
        return
    model = args.model or cfg.model or config.train.model
    checkpoint = str(Path(config.run_dir()) / "checkpoints" / "best.pt")
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    if args.model:
        checkpoint = str(tmp / "teacher.pt")
        save_checkpoint(create_model(args.model)[0], checkpoint)
    root = Path(config.root)
    if args.shards or args.samples:
        replicate(root, tmp / "subset", 1, args.shards, args.samples)
        root = tmp / "subset"
    shards = [str(root / "shards" / s) for s in json.loads((root / "shards" / "_summary.json").read_text())["shards"]]
    threads = cfg.processes * cfg.threads
    print(f"machine: {torch.get_num_threads()} torch threads available; score stage: {cfg.processes} workers x "
          f"{cfg.threads} thread(s), batch {cfg.batch_size}; bare forward: {threads} thread(s), same batch")
    bare = bare_forward(shards, checkpoint, model, cfg.batch_size, threads)
    rows = []
    for scale in sorted({1, args.scale}):
        data = root if scale == 1 else tmp / f"x{scale}"
        if scale > 1:
            replicate(root, data, scale)
        seconds, peak, summary = run(args.config, data, tmp / f"scores{scale}", checkpoint, model)
        rows.append((scale, seconds, peak, summary))
    tmp_dir.cleanup()
    print(f"\nteacher {model}; bare forward: {bare:.1f} pairs/s")
    print(f"{'data':>5} {'pairs':>7} {'wall s':>7} {'e2e p/s':>8} {'ratio':>6} {'embed p/s':>9} {'ratio':>6} "
          f"{'beyond embed':>12} {'peak MiB':>9}  phases (wall s)")
    for scale, seconds, peak, s in rows:
        wall = s["seconds"]["wall"]
        pairs = s["counts"]["samples"]
        embed_rate = pairs / wall["embed"]
        beyond = (wall["globals"] + wall["score"]) / wall["embed"]
        print(f"{scale:>4}x {pairs:>7} {seconds:>7.1f} {pairs / seconds:>8.0f} {pairs / seconds / bare:>6.2f} "
              f"{embed_rate:>9.0f} {embed_rate / bare:>6.2f} {beyond:>11.0%} {peak / 2**20:>9.0f}  "
              + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))


if __name__ == "__main__":
    main()
