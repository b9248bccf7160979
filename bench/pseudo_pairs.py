"""How often MMCL's pseudo-pairs are right on the curate stage's unpaired pools (why MMCL
does not beat CLIP on the efficacy worlds), with independent and with aligned batching.

    python bench/pseudo_pairs.py configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml

The pool rows are the pairs the default curation rejected (images with their rejected captions).
Batches of m rows are drawn as `train.unpaired.batching` draws them: aligned (a batch's images and
texts from the same rows) or independent (images and texts from different random rows). For each
image: is its true caption (the world's clean caption) in the batch at all, and is the teacher's
argmax text (`teacher_pairs`, from the score stage's teacher embeddings, or with `--student ROW`
from that efficacy row's best checkpoint at seed 0) a true caption of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import join, load_config  # noqa: E402
from pipelines.io import read_json, read_scores  # noqa: E402
from pipelines.world import world_truth  # noqa: E402
from train.data import make_pipeline  # noqa: E402
from train.evaluate import encode  # noqa: E402
from train.losses import teacher_pairs  # noqa: E402
from train.losses.clip import flat  # noqa: E402
from train.models import create_model  # noqa: E402


def pool_rows(config) -> pl.DataFrame:
    """The rejected rows with their teacher embeddings, their caption and their true caption."""
    scores, _, _ = read_scores(config, ["key", "row", "teacher_image_emb", "teacher_text_emb"])
    rejected = pl.read_parquet(join(config.curate_dir(), "keep.parquet")).filter(~pl.col("keep")).select("key")
    truth = world_truth(config, ("row", "caption", "clean_caption", "noisy"))
    return rejected.join(scores, on="key").join(truth, on="row").sort("key")


def student_embeddings(config, row: str) -> pl.DataFrame:
    """The image pool's rows (images with their rejected captions) embedded by a row's best checkpoint,
    read as the aligned stream reads them (`make_pipeline(..., complete_only=True)`), each row once."""
    checkpoint = join(config.root, "runs", f"compare_{row}_s0", "checkpoints", "best.pt")
    model, _, preprocess, tokenizer = create_model(config.train.model, checkpoint)
    pool = read_json(join(config.curate_dir(), "_summary.json"))["export"]["unpaired_images"]["urls"]
    keys, images, texts = [], [], []
    model.eval()
    for batch in make_pipeline(pool, preprocess, tokenizer, 256, complete_only=True):
        keys += batch["key"]
        images.append(flat(encode(model, images=batch["image"])))
        texts.append(flat(encode(model, texts=batch["text"])))
    return pl.DataFrame({"key": keys, "teacher_image_emb": torch.cat(images).numpy(),
                         "teacher_text_emb": torch.cat(texts).numpy()})


def unit(column: pl.Series) -> torch.Tensor:
    x = torch.from_numpy(np.stack(column.to_numpy()).astype(np.float32))
    return x / x.norm(dim=1, keepdim=True)


def draw(rows: pl.DataFrame, batching: str, m: int, draws: int, seed: int) -> dict:
    images, texts = unit(rows["teacher_image_emb"]), unit(rows["teacher_text_emb"])
    caption, truth = rows["caption"].to_list(), rows["clean_caption"].to_list()
    rng = np.random.default_rng(seed)
    in_batch = right = 0
    for _ in range(draws):
        i = rng.choice(len(rows), m, replace=False)
        t = i if batching == "aligned" else rng.choice(len(rows), m, replace=False)
        pairs = teacher_pairs(images[i] @ texts[t].T).image_to_text.tolist()
        batch_captions = {caption[j] for j in t}
        in_batch += sum(truth[a] in batch_captions for a in i)
        right += sum(caption[t[p]] == truth[a] for a, p in zip(i, pairs))
    return {"true caption in batch": in_batch / (m * draws), "argmax text is true": right / (m * draws)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--batch", type=int, default=64, help="unpaired batch size m (the efficacy rows' 64)")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student", help="embed with this efficacy row's best checkpoint (seed 0) instead of the teacher")
    args = parser.parse_args()
    print("| world | pool rows | true pairs in pool | batching | true caption in batch | argmax text is true |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        config = load_config(path, [])
        rows = pool_rows(config)
        if args.student:
            rows = rows.drop("teacher_image_emb", "teacher_text_emb").join(student_embeddings(config, args.student), on="key")
        for batching in ("independent", "aligned"):
            out = draw(rows, batching, args.batch, args.draws, args.seed)
            print(f"| {Path(path).stem} | {len(rows)} | {1 - rows['noisy'].mean():.3f} | {batching} | "
                  f"{out['true caption in batch']:.3f} | {out['argmax text is true']:.3f} |")


if __name__ == "__main__":
    main()
