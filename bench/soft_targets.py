"""What SoftCLIP's teacher targets say (why SoftCLIP does not beat CLIP on the efficacy worlds).

    python bench/soft_targets.py configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml

For random training batches of each world (its scores and truth table, as the config places them),
the intra-modal target of docs/METHODS.md section 1, q[i,:] = softmax_j(<a_i, a_j> / tau_s) from the score
stage's teacher embeddings at the teacher's own temperature, and where its off-diagonal mass goes: to
pairs whose (first) object has the same colour, the same shape, or both, against the share of such
pairs in the batch (what a target blind to that attribute would give). A target that "partly
describes" should put its mass on pairs that share what the captions say.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import join, load_config  # noqa: E402
from pipelines.io import read_json, read_scores  # noqa: E402
from pipelines.world import world_truth  # noqa: E402


def embeddings(config) -> tuple[dict[str, np.ndarray], pl.DataFrame, float]:
    scores, _, _ = read_scores(config, ["row", "status", "teacher_image_emb", "teacher_text_emb"])
    data = scores.filter(pl.col("status") == "scored").join(world_truth(config, ("row", "shape", "colour")), on="row")
    unit = {}
    for side in ("image", "text"):
        x = np.stack(data[f"teacher_{side}_emb"].to_numpy()).astype(np.float32)
        unit[side] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit, data, read_json(join(config.score_dir(), "_summary.json"))["teacher"]["tau_s"]


def target_mass(x: np.ndarray, labels: dict[str, np.ndarray], tau: float, batch: int, draws: int, seed: int) -> dict:
    """Mean diagonal of q, and per attribute the share of q's off-diagonal mass on pairs sharing it vs the batch share."""
    rng = np.random.default_rng(seed)
    out = {"q_ii": [], **{k: [] for k in labels}, **{f"{k} chance": [] for k in labels}}
    for _ in range(draws):
        idx = rng.choice(len(x), batch, replace=False)
        logits = x[idx] @ x[idx].T / tau
        q = np.exp(logits - logits.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        off = q * (1 - np.eye(batch))
        out["q_ii"].append(np.diag(q).mean())
        for name, label in labels.items():
            same = (label[idx][:, None] == label[idx][None]) & ~np.eye(batch, dtype=bool)
            out[name].append((off * same).sum() / off.sum())
            out[f"{name} chance"].append(same.sum() / (batch * (batch - 1)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/efficacy/noise20.yaml", "configs/efficacy/noise40.yaml"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| world | side | tau_s | q_ii | off-diagonal mass on: same colour (chance) | same shape (chance) | both (chance) |")
    print("|---|---|---|---|---|---|---|")
    for path in args.configs:
        unit, data, tau = embeddings(load_config(path))
        shape, colour = data["shape"].to_numpy(), data["colour"].to_numpy()
        labels = {"colour": colour, "shape": shape, "both": np.char.add(colour.astype(str), shape.astype(str))}
        for side, x in unit.items():
            m = target_mass(x, labels, tau, args.batch, args.draws, args.seed)
            cells = " | ".join(f"{m[k]:.3f} ({m[f'{k} chance']:.3f})" for k in labels)
            print(f"| {Path(path).stem} | {side} | {tau:.4f} | {m['q_ii']:.3f} | {cells} |")


if __name__ == "__main__":
    main()
