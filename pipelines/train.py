"""The train stage: resolve shards and the run folder from the config, then train in-process or under torchrun.

`python -m pipelines.train RESOLVED.yaml` is what each torchrun process runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import polars as pl

from pipelines.config import Config, ConfigError, join, load_config, save_config
from pipelines.io import atomic_open, exists, finished_shards, prepare_output, read_json, record_stage, write_json


def run_train(config: Config) -> dict:
    out = config.run_dir()
    config = resolve(config)
    prepare_output(out, "train")  # no identity: a run folder resumes from its latest.pt
    resolved = join(out, "_config.yaml")
    save_config(config, resolved)
    if config.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={config.train.nproc}", "-m", "pipelines.train", resolved]
        print(f"train: {' '.join(command)}")
        subprocess.run(command, check=True)
        summary = read_json(join(out, "_summary.json"))
    else:
        summary = train_here(config)
    record_stage(config, f"train:{config.train.name}", {"output": out, "summary": summary})
    last = summary.get("last", {})
    val = f"{summary['best_val_recall']:.3f}" if summary["best_val_recall"] >= 0 else "n/a (no validation split)"
    loss = f"loss {last['loss']:.4f}" if "loss" in last else "no loss logged by this process (a finished run resumed, or fewer steps than log_every)"
    print(f"\ntrain summary: {summary['steps']} steps, {loss}, "
          f"{summary['skipped_samples']} bad samples skipped, best val R@1 {val}, "
          f"checkpoint {summary['final_checkpoint']}")
    for k in range(config.train.folds if config.train.folds > 1 else 0):
        run_train(fold_config(config, k))
    return summary


def fold_config(config: Config, k: int) -> Config:
    """The k-th held-out teacher: the teacher's settings, trained on the pairs outside fold k (a keep-list of
    the shards' keys, within the teacher's own keep-list if it has one), with as many epochs."""
    from curate.scores import folds_of

    cfg = config.train
    out = f"{config.run_dir()}_fold{k}"
    keep = join(out, "fold_keep.parquet")
    if not exists(keep):
        table = fold_pairs(config)
        table = table.with_columns(keep=pl.col("keep") & pl.Series(folds_of(table["key"].to_list(), config.seed, cfg.folds) != k))
        with atomic_open(keep) as f:
            table.write_parquet(f)
    return config.model_copy(update={"train": cfg.model_copy(update={
        "name": f"{cfg.name}_fold{k}", "output": out, "folds": 1, "keep_list": keep, "epoch_checkpoints": False})})


def fold_pairs(config: Config) -> pl.DataFrame:
    """key, keep, weight of every pair the teacher trains on: its keep-list, or the shards' downloaded pairs
    (img2dataset's table beside each tar)."""
    from pipelines.score_tasks import listed_rows
    from train.data import expand_urls

    if config.train.keep_list:
        with fsspec.open(config.train.keep_list, "rb") as f:
            return pl.read_parquet(f, columns=["key", "keep", "weight"])
    keys = []
    for url in expand_urls(config.train.shards):
        if not exists(url.removesuffix(".tar") + ".parquet"):
            raise ConfigError(f"train.folds: {url.removesuffix('.tar')}.parquet not found; held-out teachers take the "
                              f"pairs' keys from each shard's img2dataset table")
        keys += listed_rows(url)
    return pl.DataFrame({"key": keys, "keep": [True] * len(keys), "weight": [1.0] * len(keys)},
                        schema={"key": pl.String, "keep": pl.Boolean, "weight": pl.Float64})


def resolve(config: Config) -> Config:
    """Fill the defaults that depend on other stages: shards, their scores, output, seed, SoftCLIP's teacher tau_s."""
    cfg = config.train
    update = {"seed": cfg.seed if cfg.seed is not None else config.seed, "output": config.run_dir()}
    if cfg.epoch_checkpoints is None:  # this run is the teacher the score stage averages over its epochs
        update["epoch_checkpoints"] = (not config.score.checkpoints and config.score.teacher_epochs != "best"
                                       and cfg.folds == 1)  # held out (folds > 1), no epoch rule applies
    if not cfg.shards:
        try:
            update["shards"] = "::".join(finished_shards(config))
        except ConfigError as err:
            raise ConfigError(f"train.shards is not set and {err} (or set train.shards)") from None
        if not cfg.scores:  # the shard stage's shards join this pipeline's scores, wherever score.output put them
            update["scores"] = config.score_dir()
    summary = read_json(join(config.score_dir(), "_summary.json"))
    teacher_targets = cfg.loss_args.get("target", "teacher") == "teacher"  # target self: the student's own 1/s
    if cfg.loss == "softclip" and teacher_targets and "tau_s" not in cfg.loss_args and summary:
        # SoftCLIP's teacher targets at the temperature the teacher learned (docs/METHODS.md section 1)
        update["loss_args"] = {**cfg.loss_args, "tau_s": summary["teacher"]["tau_s"]}
    return config.model_copy(update={"train": cfg.model_copy(update=update)})


def train_here(config: Config) -> dict:
    from train.loop import SetupError, train

    cfg = config.train
    try:
        summary = train(cfg)
    except SetupError as err:
        raise ConfigError(f"train: cannot start: {err}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        write_json(join(config.run_dir(), "_summary.json"), summary)
    return summary


if __name__ == "__main__":
    train_here(load_config(sys.argv[1]))
