"""Noise detection against the teacher's epoch: which checkpoint (or average of checkpoints) should score?

Scores the demo shards once with every epoch checkpoint of the demo teacher (the score stage's
training-dynamics mode) and prints the AUROC of each epoch's per-pair loss for finding the injected
noise, then of the loss averaged over all epochs, beside the best-validation checkpoint alone.

    softcurate run configs/demo.yaml          # world, shards, teacher (epoch checkpoints kept), scores
    python bench/teacher_epochs.py            # AUROC by teacher epoch
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before bench/ (bench/train.py)

from pipelines.config import load_config  # noqa: E402
from pipelines.score import run_score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--output", default=None, help="default: <root>/scores_by_epoch")
    args = parser.parse_args()
    config = load_config(args.config)
    checkpoints = Path(config.run_dir()) / "checkpoints"
    out = args.output or f"{config.root}/scores_by_epoch"
    summary = run_score(load_config(args.config, [f"score.output={out}",
                                                  f"score.checkpoints=['{checkpoints}/epoch_*.pt']"]))
    best = json.loads(Path(config.score_dir(), "_summary.json").read_text())
    metrics = [json.loads(line) for line in (Path(config.run_dir()) / "metrics.jsonl").read_text().splitlines()]
    val = {round(m["step"] / best_steps_per_epoch(config)): m["val_recall@1"] for m in metrics if "val_recall@1" in m}
    print(f"\n{'epoch':>5}  {'val R@1':>7}  {'AUROC loss':>10}")
    for row in summary["detection"]["auroc_by_checkpoint"]:
        epoch = int(re.search(r"epoch_(\d+)", row["checkpoint"]).group(1))
        print(f"{epoch:>5}  {val.get(epoch, float('nan')):>7.3f}  {row['loss']:>10.3f}")
    a = summary["detection"]["auroc"]
    print(f"\nloss averaged over all {len(summary['detection']['auroc_by_checkpoint'])} epochs: AUROC loss {a['loss']:.3f}, "
          f"clean_prob {a['clean_prob']:.3f}")
    b = best["detection"]["auroc"]
    print(f"best-validation checkpoint alone ({best['teacher']['checkpoints'][0]}): AUROC loss {b['loss']:.3f}, "
          f"clean_prob {b['clean_prob']:.3f}, cosine {b['cosine']:.3f}, DN {b['dn_score']:.3f}")


def best_steps_per_epoch(config) -> int:
    return json.loads(Path(config.run_dir(), "_summary.json").read_text())["steps_per_epoch"]


if __name__ == "__main__":
    main()
