"""Noise detection by teacher epoch and by noise kind: which checkpoints should the per-pair loss come from?

Scores the shards once with the teacher's best.pt and every epoch checkpoint (the score stage's
training-dynamics mode, one embedding pass), then prints the AUROC of each signal for each injected
noise kind (that kind against the clean pairs) and for all noisy pairs: best.pt's cosine, DN score,
loss and clean_prob; each epoch's loss; the loss averaged over the first three epochs, over epochs 1 to
the end of early learning (the score stage's default rule: the epoch, up to the best-validation one, whose
losses the mixture finds noisiest), over epochs 1 to the best-validation epoch and over all epochs (the area
under the loss curve, as in Dataset Cartography and AUM); Dataset Cartography's confidence (mean exp(-loss))
and the mean per-epoch loss rank over the same epochs. A clean_prob row is the two-Gaussian mixture fitted
on that row's loss. If the config's own score stage has run, its detection (the default) is printed last.
Scores already in the output folder for the same checkpoints are reused.

    softcurate run configs/noise_kinds.yaml    # world, shards, teacher (epoch checkpoints kept), default scores
    python bench/teacher_epochs.py --config configs/noise_kinds.yaml
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before bench/ (bench/train.py)

from curate.scores import auroc, clean_probability, early_learning_end, estimated_noise, fit_mixture  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.io import read_truth, with_truth  # noqa: E402
from pipelines.score import run_score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/noise_kinds.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, e.g. root=...")
    parser.add_argument("--output", default=None, help="default: <root>/scores_by_epoch")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    run = Path(config.run_dir())
    epochs = sorted(run.glob("checkpoints/epoch_*.pt"), key=lambda p: int(re.search(r"epoch_(\d+)", p.name).group(1)))
    if not epochs:
        sys.exit(f"{run}/checkpoints has no epoch_NNN.pt: train the teacher with train.epoch_checkpoints: true")
    out = args.output or f"{config.root}/scores_by_epoch"
    checkpoints = [str(run / "checkpoints" / "best.pt")] + [str(p) for p in epochs]
    done = Path(out, "_summary.json")
    if not done.exists() or json.loads(done.read_text())["teacher"]["checkpoints"] != checkpoints:
        run_score(load_config(args.config, [*args.set, f"score.output={out}", f"score.checkpoints={json.dumps(checkpoints)}"]))
    scores = pl.read_parquet(f"{out}/0*.parquet").filter(pl.col("status") == "scored")
    known = with_truth(config, scores, read_truth(config.truth)).filter(pl.col("noisy").is_not_null())
    noisy, kinds = known["noisy"].to_numpy(), known["noise_type"].to_numpy()
    per = np.asarray(known["loss_by_checkpoint"].to_list())  # column 0: best.pt, then epoch 1, 2, ...
    best = best_epoch(run)
    print(f"\nteacher {run}: {len(epochs)} epochs, best validation at epoch {best}; "
          f"{len(known)} labelled pairs, {int(noisy.sum())} noisy")
    noise = [estimated_noise(per[:, e], config.seed) for e in range(1, best + 1)]
    end = early_learning_end(list(range(1, best + 1)), noise)
    print("noise the mixture finds by epoch: " + ", ".join(f"{e}: {n:.3f}" for e, n in enumerate(noise, 1))
          + f" (labelled: {noisy.mean():.3f})")
    spans = {f"1-{end} (early)": range(1, end + 1), "1-3 (fixed)": range(1, min(3, len(epochs)) + 1),
             f"1-{best} (up to best)": range(1, best + 1), f"1-{len(epochs)} (all)": range(1, len(epochs) + 1)}
    signals = {"best.pt cosine": -known["cosine"].to_numpy(), "best.pt DN score": -known["dn_score"].to_numpy(),
               "best.pt loss": per[:, 0], "best.pt clean_prob": -mixture_prob(per[:, 0], config.seed)}
    signals |= {f"epoch {e} loss": per[:, e] for e in range(1, len(epochs) + 1)}
    for span, es in spans.items():
        mean = per[:, list(es)].mean(1)
        signals |= {f"mean loss {span}": mean, f"clean_prob of mean loss {span}": -mixture_prob(mean, config.seed),
                    f"confidence {span}": -np.exp(-per[:, list(es)]).mean(1),
                    f"mean loss rank {span}": np.mean([rankdata(per[:, e]) for e in es], axis=0)}
    names = sorted(set(kinds[noisy]))
    print(f"\n{'AUROC (noise kind vs clean)':<40} " + " ".join(f"{short(k):>9}" for k in names) + f" {'all':>9}")
    for label, values in signals.items():
        row = [auroc(noisy[(kinds == k) | ~noisy], values[(kinds == k) | ~noisy]) for k in names]
        print(f"{label:<40} " + " ".join(f"{a:>9.3f}" for a in row) + f" {auroc(noisy, values):>9.3f}")
    print(f"\n{'flagged (clean_prob < 0.5)':<40} " + " ".join(f"{short(k):>9}" for k in [*names, "clean"])
          + f" {'est. noise':>10} (labelled {noisy.mean():.3f})")
    for label, values in signals.items():
        if "clean_prob" in label:  # stored negated: high when noisy
            flagged = -values < 0.5
            print(f"{label:<40} " + " ".join(f"{flagged[kinds == k].mean():>9.3f}" for k in [*names, "clean"])
                  + f" {1 + values.mean():>10.3f}")
    default = Path(config.score_dir(), "_summary.json")
    if default.exists():
        summary = json.loads(default.read_text())
        d = summary["detection"]
        print(f"\nthe score stage's default ({summary['teacher']['loss_rule']}: {len(summary['teacher']['checkpoints'])} "
              f"checkpoint(s), the first gives cosine and DN):")
        print(f"{'':<40} " + " ".join(f"{short(k):>9}" for k in d["by_kind"]) + f" {'all':>9}")
        for name in ("clean_prob", "loss", "cosine", "dn_score"):
            print(f"{name:<40} " + " ".join(f"{v['auroc'][name]:>9.3f}" for v in d["by_kind"].values())
                  + f" {d['auroc'][name]:>9.3f}")
        print(f"noise rate {d['noise_rate']['estimated']:.3f} estimated, {d['noise_rate']['labelled']:.3f} labelled; "
              f"clean pairs flagged {d['clean_flagged']:.3f}")


def mixture_prob(loss: np.ndarray, seed: int) -> np.ndarray:
    """clean_prob as the score stage computes it, the mixture fitted on these losses (every pair: n < mixture_samples)."""
    return clean_probability(fit_mixture(loss, seed), loss)


def best_epoch(run: Path) -> int:
    """The epoch whose validation recall best.pt kept (the first maximum, as the train loop keeps it)."""
    summary = json.loads((run / "_summary.json").read_text())
    if summary.get("best_epoch"):
        return summary["best_epoch"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["val_recall@1"], -r["step"]) for r in rows if "val_recall@1" in r]
    return math.ceil(-max(val)[1] / summary["steps_per_epoch"])


def short(kind: str) -> str:
    return {"swapped_caption": "swapped", "wrong_attribute": "wrong_att", "boilerplate": "boilerpl",
            "unrelated_caption": "unrelated", "near_duplicate": "near_dup"}.get(kind, kind[:9])


if __name__ == "__main__":
    main()
