"""How partial captions shape noise detection: the ablation behind the noise-rate overshoot, clean_prob
against the cosine, and the wrong-attribute misses.

A world's clean captions are full ("big checked swatch, green on white (left)") or partial ("polka-dot
card"); a partial caption fits many images. For each teacher's scores of a world this prints, from the
world's truth table (a benchmark may read it; no stage does):
- the clean pairs flagged (clean_prob < 0.5) and their mean clean_prob, partial against full captions,
  and the noise rate the mixture estimates against the injected one; the same mixture fitted on the
  loss and on the cosine (is the overshoot the signal's, or the two-component model's?);
- each noise kind's AUROC (loss, cosine, clean_prob) against all clean pairs and against the clean pairs
  with a full caption only: how much of a miss the partial captions make;
- one wrong attribute, split by the attribute changed (the one word in which the caption differs from
  the true one), against both sets of clean pairs.

    python bench/partial_captions.py data/efficacy20 scores scores_pretrained
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.scores import NOISY_WHEN, clean_probability, detection_report, fit_mixture  # noqa: E402
from pipelines.io import read_json  # noqa: E402
from pipelines.worlds import generator  # noqa: E402

SIGNALS = ("loss", "cosine", "clean_prob")


def word_attributes(kind: str) -> dict[str, str]:
    """Every caption word of the world's generator -> the attribute it names."""
    g = generator(kind)
    words = {w: attr for attr, values in g.WORDS.items() for ws in values.values() for w in ws}
    words |= {w: "shape" for w in getattr(g, "SHAPE_ADJECTIVES", {}).values()}  # "heart-shaped"
    return words | {w: "pattern" for ws in getattr(g, "PATTERN_NOUNS", {}).values() for w in ws}


def changed_attribute(caption: str, true_caption: str, words: dict[str, str]) -> str:
    diff = [b for a, b in zip(caption.split(), true_caption.split()) if a != b]
    return words.get(diff[0].strip(",.;()"), "other") if len(diff) == 1 else "other"


def scored_pairs(root: Path, scores: str) -> pl.DataFrame:
    truth = pl.read_parquet(root / "world" / "truth.parquet")
    pairs = pl.read_parquet(root / scores / "*.parquet", columns=["row", "status", *SIGNALS])
    return pairs.filter(pl.col("status") == "scored").join(truth, on="row")


def report(pairs: pl.DataFrame, words: dict[str, str]) -> list[str]:
    noisy, partial = pairs["noisy"].to_numpy(), pairs["partial"].to_numpy()
    clean_prob = pairs["clean_prob"].to_numpy()
    lines = [f"  noise rate: estimated {1 - clean_prob.mean():.3f}, injected {noisy.mean():.3f}"]
    for signal in ("loss", "cosine"):  # is the overshoot the loss's, or any two-component mixture's?
        x = NOISY_WHEN[signal] * pairs[signal].to_numpy()
        p = clean_probability(fit_mixture(x, 0), x)
        lines.append(f"  a two-Gaussian mixture on the {signal}: noise rate {1 - p.mean():.3f}, flagged: clean partial "
                     f"{(p[~noisy & partial] < 0.5).mean():.1%}, clean full {(p[~noisy & ~partial] < 0.5).mean():.1%}, "
                     f"noisy {(p[noisy] < 0.5).mean():.1%}")
    for name, part in (("partial", ~noisy & partial), ("full", ~noisy & ~partial)):
        lines.append(f"  clean, {name} captions: {part.sum()} pairs ({part.sum() / (~noisy).sum():.1%}), flagged "
                     f"{(clean_prob[part] < 0.5).mean():.1%}, mean clean_prob {clean_prob[part].mean():.3f}")
    # one wrong attribute, also split by the attribute changed
    kinds = pairs["noise_type"].to_numpy().astype(object)
    fine = np.array([f"wrong_attribute: {changed_attribute(c, t, words)}" if k == "wrong_attribute" else k
                     for k, c, t in zip(kinds, pairs["caption"], pairs["clean_caption"])], dtype=object)
    scores = {s: pairs[s].to_numpy() for s in SIGNALS}
    full = noisy | ~partial  # every noisy pair against the clean pairs with a full caption

    def against(mask: np.ndarray) -> dict:
        coarse = detection_report(noisy[mask], kinds[mask], {s: v[mask] for s, v in scores.items()})
        split = detection_report(noisy[mask], fine[mask], {s: v[mask] for s, v in scores.items()})["by_kind"]
        return {"all noisy": coarse["auroc"], **{k: v["auroc"] for k, v in (coarse["by_kind"] | split).items()}}

    every, only_full = against(np.ones(len(noisy), bool)), against(full)
    lines.append(f"  {'AUROC against clean pairs':<34} {'pairs':>6} " + " ".join(f"{s + ' all/full':>20}" for s in SIGNALS))
    for name in ["all noisy", *sorted(set(every) - {"all noisy"})]:
        count = noisy.sum() if name == "all noisy" else ((kinds == name) | (fine == name)).sum()
        lines.append(f"  {name:<34} {count:>6} " + " ".join(f"{every[name][s]:>10.3f} / {only_full[name][s]:.3f}" for s in SIGNALS))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a world's dataset root (world/truth.parquet, the score folders)")
    parser.add_argument("scores", nargs="+", help="score folders under the root, one per teacher")
    args = parser.parse_args()
    kind = read_json(str(args.root / "world" / "world.json"))["config"]["kind"]
    words = word_attributes(kind)
    for scores in args.scores:
        print(f"{args.root.name} / {scores}")
        print("\n".join(report(scored_pairs(args.root, scores), words)))


if __name__ == "__main__":
    main()
