"""Why DN does or does not beat the dot product on a world: DN's gain by lambda and by where its means come from.

    python bench/dn_ablation.py configs/efficacy/noise40.yaml 'compare_*_pretrained_s1' compare_clip_raw_s1

For each run's best.pt (runs/<run>/ under the world's root; globs allowed), on the world's clean test split:
- R@1 (mean of both directions) with the dot product, and DN's gain over it at lambda 0.25, 0.5 and 1 with
  the evaluation's means (`dn_samples` unlabeled validation samples, mean over `dn_seeds` draws), and at
  lambda 0.5 with the test split's own means: DN's best case, so a loss there is not the means' estimate;
- the same for each zero-shot task (top-1);
- what DN has to correct: the length of each modality's mean embedding (0: spread over the sphere,
  1: one point), and hubness, the skewness of N10 (how many images have each text among their 10 nearest;
  Radovanovic et al., JMLR 2010), with the dot product and with DN at lambda 0.5 (test means).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import join, load_config  # noqa: E402
from pipelines.evaluate import load, seeded_means, task_result, zero_shot_tasks  # noqa: E402
from train.data import expand_urls  # noqa: E402
from train.evaluate import batched_encode, read_split, retrieval, similarity, with_dn  # noqa: E402

LAMBDAS = (0.25, 0.5, 1.0)


def r1(result: dict) -> float:
    return (result["i2t_R@1"] + result["t2i_R@1"]) / 2


def n10_skew(image: torch.Tensor, text: torch.Tensor, means=None, lam: float = 0.5) -> float:
    """Skewness of the texts' 10-occurrence counts over the images' 10 nearest texts (0: no hubs)."""
    if means is not None:
        image, text = image - lam * means[0], text - lam * means[1]
    nearest = similarity(image, text).topk(10, dim=1).indices.flatten()
    counts = torch.bincount(nearest, minlength=len(text)).double()
    centred = counts - counts.mean()
    return (centred.pow(3).mean() / centred.pow(2).mean().pow(1.5)).item()


def gains(evaluate, score, val_means, test_means) -> dict:
    """dot, and DN - dot for each lambda with the evaluation's means and at 0.5 with the test split's own.
    `evaluate(lam, means)` is a `with_dn` result; `score` reads one number from its dot or dn part."""
    by_lambda = {lam: evaluate(lam, val_means) for lam in LAMBDAS}  # each also scores the dot product
    dot = score(by_lambda[0.5]["dot"])
    row = {"dot": dot} | {f"val {lam}": score(result["dn"]) - dot for lam, result in by_lambda.items()}
    return row | {"test 0.5": score(evaluate(0.5, [test_means])["dn"]) - dot}


def ablate(config, checkpoint: str) -> dict:
    cfg = config.evaluate
    model, preprocess, tokenizer = load(cfg.model or config.train.model, checkpoint, "cpu")
    split = read_split(expand_urls(cfg.data), preprocess, tokenizer)
    image, text = batched_encode(model, "cpu", images=split["images"]), batched_encode(model, "cpu", texts=split["texts"])
    val_means = seeded_means(image, text, cfg, model, preprocess, tokenizer, "cpu", cfg.dn_data)
    test_means = (image.mean(0), text.mean(0))
    out = {"R@1": gains(lambda lam, means: with_dn(retrieval, means, image=image, text=text, lam=lam),
                        r1, val_means, test_means),
           "|mu_v|": test_means[0].norm(dim=-1).mean().item(), "|mu_t|": test_means[1].norm(dim=-1).mean().item(),
           "N10 skew dot": n10_skew(image, text), "N10 skew DN": n10_skew(image, text, test_means)}
    for name, task in zero_shot_tasks(cfg).items():
        out[name] = gains(lambda lam, means: task_result(model, tokenizer, "cpu", image, split["metas"], task, means,
                                                         cfg.model_copy(update={"dn_lambda": lam})),
                          lambda r: r["top1"], val_means, test_means)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("runs", nargs="+", help="run folders under <root>/runs (globs allowed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config, [])
    runs_dir = Path(join(config.root, "runs"))
    runs = sorted({p.name for pattern in args.runs for p in runs_dir.glob(pattern) if (p / "checkpoints" / "best.pt").exists()})
    if not runs:
        sys.exit(f"dn_ablation: no run under {runs_dir} matching {' '.join(args.runs)} has checkpoints/best.pt")
    results = {run: ablate(config, str(runs_dir / run / "checkpoints" / "best.pt")) for run in runs}
    metrics = [m for m, value in results[runs[0]].items() if isinstance(value, dict)]
    print(f"DN - dot on {config.evaluate.data}: lambda 0.25 / 0.5 / 1 with the means of {config.evaluate.dn_samples} "
          f"validation samples ({config.evaluate.dn_seeds} draws), and 0.5 with the test split's own means")
    for metric in metrics:
        print(f"\n| run ({metric}) | dot | DN - dot, val 0.25 | val 0.5 | val 1 | test 0.5 |")
        print("|---|---|---|---|---|---|")
        for run, out in results.items():
            row = out[metric]
            print(f"| {run} | {row['dot']:.3f} | " + " | ".join(f"{row[k]:+.3f}" for k in list(row)[1:]) + " |")
    print("\n| run | mean length, image | text | N10 skewness, dot | DN (lambda 0.5, test means) |")
    print("|---|---|---|---|---|")
    for run, out in results.items():
        print(f"| {run} | {out['|mu_v|']:.3f} | {out['|mu_t|']:.3f} | {out['N10 skew dot']:.2f} | {out['N10 skew DN']:.2f} |")


if __name__ == "__main__":
    main()
