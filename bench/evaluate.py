"""The evaluate stage's cost: where a checkpoint's evaluation goes, and how retrieval scales with N.

    python bench/evaluate.py configs/efficacy/noise20.yaml [--checkpoint PATH]

(1) `evaluate_checkpoint` on the world's test split, whole (after one warm-up call), then its parts timed one by one: reading
and decoding the split, encoding it, the retrieval metrics with the dot product and with DN over the
config's seeds. (2) `retrieval_recall` on random unit features of the test model's width for N pairs
up to the CC3M validation list's 15,833: it builds the N x N similarity matrix, so time and memory
grow as N^2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import join, load_config  # noqa: E402
from pipelines.evaluate import evaluate_checkpoint, load, seeded_means  # noqa: E402
from train.data import expand_urls  # noqa: E402
from train.evaluate import batched_encode, read_split, retrieval, retrieval_recall, with_dn  # noqa: E402


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--checkpoint", help="default: the efficacy row clip_curated_clean_prob's seed-0 best.pt")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 4000, 15833])
    args = parser.parse_args()
    config = load_config(args.config, [])
    checkpoint = args.checkpoint or join(config.root, "runs", "compare_clip_curated_clean_prob_s0", "checkpoints", "best.pt")
    cfg = config.evaluate

    evaluate_checkpoint(config, checkpoint)  # warm-up: the first call pays for imports and first allocations
    result, whole = timed(evaluate_checkpoint, config, checkpoint)
    model, preprocess, tokenizer = load(cfg.model or config.train.model, checkpoint, "cpu")
    split, t_read = timed(read_split, expand_urls(join(config.world_dir(), "test.tar")), preprocess, tokenizer)
    (image, text), t_encode = timed(lambda: (batched_encode(model, "cpu", images=split["images"]),
                                            batched_encode(model, "cpu", texts=split["texts"])))
    means = seeded_means(image, text, cfg)
    _, t_dot = timed(retrieval, image, text)
    _, t_dn = timed(with_dn, retrieval, means, image=image, text=text, lam=cfg.dn_lambda)
    print(f"evaluate {checkpoint}: {result['pairs']} test pairs, {whole:.2f} s in all (zero-shot and retrieval, dot and DN)")
    print(f"  read + decode the split {t_read:.2f} s, encode {t_encode:.2f} s, retrieval dot {t_dot * 1e3:.1f} ms, "
          f"dot + DN over {cfg.dn_seeds} seeds {t_dn * 1e3:.1f} ms ({t_dn / t_dot:.1f}x dot)")

    print("\n| N pairs | retrieval_recall | similarity matrix |")
    print("|---|---|---|")
    width = image.shape[-1]
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        u, v = (torch.nn.functional.normalize(torch.randn(n, width, generator=g), dim=-1) for _ in range(2))
        _, t = timed(retrieval_recall, u, v)
        print(f"| {n:,} | {t:.2f} s | {n * n * 4 / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
