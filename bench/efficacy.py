"""The efficacy table: does each method beat its baseline on noisy data? (issue 6)

    python bench/efficacy.py configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml   # the full run
    python bench/efficacy.py --smoke                                                        # CI's reduced run

For each world config: its chain (world, shards, teacher, scores, audit, curation) runs first, then
every row of configs/efficacy/rows.yaml for every seed, with the same budget; a row's result
(its validation curve, the test metrics of its best-validation checkpoint, dot and DN) is written
to docs/results/efficacy/<world>/<row>_s<seed>.json and skipped when it exists, so the full run
can be spread over several sessions. The table (mean +- std over seeds) goes to
docs/results/efficacy/<world>/<rows file>.md (rows.md, sweep.md) and is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.cli import STAGES  # noqa: E402
from pipelines.config import join, load_config  # noqa: E402
from pipelines.curate import run_curate  # noqa: E402
from pipelines.evaluate import evaluate_checkpoint  # noqa: E402
from pipelines.manifest import read_json  # noqa: E402
from pipelines.train import run_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "efficacy"
SMOKE = {"world": ["world.n_train=300", "world.n_val=60", "world.n_test=60", "shard.samples_per_shard=150",
                   "train.epochs=2", "train.batch_size=32", "curate.samples_per_shard=150"],
         "rows": ["clip_raw", "clip_curated_cosine_top", "softclip_teacher"],  # cosine_top always keeps 70%
         "budget": {"max_steps": 12, "batch_size": 32, "warmup_steps": 2, "workers": 1, "checkpoint_every": 100, "log_every": 1}}


def prepare_world(config_path: str, overrides: list[str]):
    """The world's chain (each stage resumes or skips what is done)."""
    config = load_config(config_path, overrides)
    for stage in config.stages:
        STAGES[stage](config)
    return config


def row_config(config, name: str, row: dict, seed: int, budget: dict):
    """The train config of one row and seed: the world config's root and split, the row's objective."""
    train = {k: v for k, v in row.items() if k not in ("curate", "pairs", "pools")}
    values = {"train.name": f"efficacy_{name}_s{seed}", "train.seed": seed, "train.epoch_checkpoints": False,
              "train.epochs": 1000, **{f"train.{k}": v for k, v in {**budget, **train}.items() if k != "unpaired"}}
    for key, value in row.get("unpaired", {}).items():
        values[f"train.unpaired.{key}"] = value
    if row.get("curate"):
        out = join(config.root, "efficacy_curated", name)
        policy = load_config(None, [f"root={config.root}", f"curate.output={out}"], {"curate.policy": row["curate"]})
        run_curate(config.model_copy(update={"curate": policy.curate}), export=False)
        values["train.keep_list"] = join(out, "keep.parquet")
    export = read_json(join(config.curate_dir(), "_summary.json"), {}).get("export")
    if row.get("pairs") == "curated":
        values["train.shards"] = export["shards"]["urls"]
    if row.get("pools"):
        values["train.unpaired.images"] = export["unpaired_images"]["urls"]
        values["train.unpaired.texts"] = export["unpaired_texts"]["urls"]
    data = config.model_dump(mode="json")
    data["train"] = {**data["train"], "output": None, "pretrained": None, "loss_args": {}, "keep_list": None}
    return load_config(None, [], {**flatten(data), **values})


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("loss_args",):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_row(config, name: str, row: dict, seed: int, budget: dict) -> dict:
    cfg = row_config(config, name, row, seed, budget)
    summary = run_train(cfg)
    metrics = [json.loads(line) for line in (Path(cfg.run_dir()) / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": m["step"], "val_recall@1": m["val_recall@1"]} for m in metrics if "val_recall@1" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    best = Path(cfg.run_dir()) / "checkpoints" / "best.pt"
    result = evaluate_checkpoint(cfg, str(best))
    return {"row": name, "seed": seed, "train": cfg.train.model_dump(mode="json"), "steps": summary["steps"],
            "best_val_recall": summary["best_val_recall"], "val_curve": curve,
            "loss_first": float(np.mean(losses[:5])), "loss_last": float(np.mean(losses[-5:])), "test": result}


def headline(result: dict) -> dict:
    """The numbers of one run that go into the table."""
    test = result["test"]
    out = {}
    for space in ("dot", "dn"):
        for task, scores in test["zero_shot"].items():
            out[f"{task} top1 {space}"] = scores[space]["top1"]
        r = test["retrieval"][space]
        out[f"R@1 {space}"] = (r["i2t_R@1"] + r["t2i_R@1"]) / 2
    out["best val R@1"] = result["best_val_recall"]
    return out


def table(world: str, results: list[dict], detection: dict | None) -> str:
    rows = {}
    for result in results:
        rows.setdefault(result["row"], []).append(headline(result))
    columns = list(next(iter(rows.values()))[0])
    lines = [f"### {world}", ""]
    if detection:
        lines += ["noise detection (AUROC against the injected noise): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in detection["auroc"].items())
                  + f"; temperature indicator {detection['temperature_indicator']:.3g}", ""]
    lines += ["| row | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, runs in rows.items():
        cells = [f"{np.mean([r[c] for r in runs]):.3f} +- {np.std([r[c] for r in runs]):.3f}" for c in columns]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/efficacy/noise20.yaml", "configs/efficacy/noise40.yaml"])
    parser.add_argument("--rows", default="configs/efficacy/rows.yaml")
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds of rows.yaml")
    parser.add_argument("--smoke", action="store_true", help="a tiny world, one seed, three rows, a few steps (CI)")
    parser.add_argument("--results", default=None, help=f"default {RESULTS.relative_to(ROOT)} (smoke: a temporary folder)")
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.rows).read_text())
    seeds, budget, rows = spec["seeds"], spec["budget"], spec["rows"]
    overrides, results_dir, tmp = [], Path(args.results or RESULTS), None
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="efficacy-smoke-")
        args.configs, seeds, budget = args.configs[:1], [0], {**budget, **SMOKE["budget"]}
        rows = {k: rows[k] for k in SMOKE["rows"]}
        overrides = [f"root={tmp}/world", *SMOKE["world"]]
        results_dir = Path(args.results) if args.results else Path(tmp) / "results"
    rows = {k: v for k, v in rows.items() if not args.only or k in args.only}
    seeds = args.seeds or seeds
    worlds = {Path(path).stem: prepare_world(path, overrides) for path in args.configs}
    # seed-major, so that a run stopped part-way has every row and world at the first seeds
    for seed in seeds:
        for world, config in worlds.items():
            for name, row in rows.items():
                path = results_dir / world / f"{name}_s{seed}.json"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    result = run_row(config, name, row, seed, budget)
                    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    for world, config in worlds.items():
        out = results_dir / world
        results = [json.loads((out / f"{name}_s{seed}.json").read_text())
                   for name in rows for seed in seeds if (out / f"{name}_s{seed}.json").exists()]
        summary = read_json(join(config.score_dir(), "_summary.json"), {})
        detection = summary.get("detection") and {**summary["detection"],
                                                  "temperature_indicator": summary["noise"]["temperature_indicator"]}
        text = table(world, results, detection)
        (out / f"{Path(args.rows).stem}.md").write_text(text)
        print("\n" + text)
    if tmp:
        print(f"smoke run: {tmp}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
