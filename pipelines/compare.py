"""The compare stage: students trained with one budget, evaluated side by side (one table).

Each row of `compare.rows` is a train config (loss, loss_args, oblique_k, ...) on top of the shared
`compare.budget`, plus where its data comes from:
    curate: [policy steps]   train on the raw shards through a keep-list made with that policy
    pairs: curated           train on the curate stage's export instead of the raw shards
    pools: true              MMCL's unpaired pools from that export
    score: {output, ...}     score settings of another teacher (its scores written by the score stage with
                             them): the row's keep-list, soft targets and clean_prob come from there
    baseline: ROW            the table adds this row's gain over ROW, seed by seed
Every row and seed is validated on the clean validation split each epoch; its best checkpoint (best.pt)
is evaluated on the test split (zero-shot and retrieval, dot and DN) and the result written to
`<root>/compare/<row>_s<seed>.json`, which a re-run skips. The demo trains a CLIP baseline on the raw
shards and SoftCLIP on the curated pairs; bench/efficacy.py runs the efficacy table's rows the same way.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np

from pipelines.config import COMPARE_DATA_KEYS, Config, ConfigError, join, load_config, set_key, validate
from pipelines.io import atomic_write, exists, read_json, record_stage, write_json


def run_compare(config: Config) -> dict:
    cfg, out = config.compare, config.compare_dir()
    results = run_rows(config, cfg.rows, cfg.seeds, cfg.budget, out)
    teacher = evaluate_teacher(config, out)
    text = table("compare", ([teacher] if teacher else []) + results, detection(config), cfg.rows)
    atomic_write(join(out, "table.md"), text)
    atomic_write(join(out, "curves.png"), plot_curves("compare", results))
    summary = {"rows": summarize(results), "versus": versus(results, cfg.rows), "teacher": headline(teacher) if teacher else None,
               "seeds": cfg.seeds, "budget": cfg.budget}
    write_json(join(out, "summary.json"), summary)
    record_stage(config, "compare", {"output": out, "rows": sorted(cfg.rows)})
    print("\n" + text)
    return summary


def run_rows(config: Config, rows: dict, seeds: list[int], budget: dict, out: str) -> list[dict]:
    """Train and evaluate every row for every seed (row-major); results already in `out` are kept."""
    results = []
    for name, row in rows.items():
        for seed in seeds:
            results.append(run_once(config, name, row, seed, budget, out))
    return results


def run_once(config: Config, name: str, row: dict, seed: int, budget: dict, out: str) -> dict:
    path = join(out, f"{name}_s{seed}.json")
    result = read_json(path)
    if result is None:
        result = run_row(config, name, row, seed, budget)
        write_json(path, result)
        return result
    wanted = {k: v for k, v in {**budget, **row}.items() if k not in COMPARE_DATA_KEYS}
    if (differs := mismatch(result.get("train", {}), wanted)) is not None:  # the row was edited since it ran
        raise ConfigError(f"{path} was trained with {differs}; delete it to train the row as it is now")
    return result


def mismatch(stored: dict, wanted: dict, prefix: str = "") -> str | None:
    """The first setting in `wanted` that the stored train config does not have, or None."""
    for key, value in wanted.items():
        have = stored.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            if (inner := mismatch(have, value, f"{prefix}{key}.")) is not None:
                return inner
        elif have != value:
            return f"{prefix}{key}: {have!r}, not {value!r}"
    return None


def row_config(config: Config, name: str, row: dict, seed: int, budget: dict) -> Config:
    """The train config of one row and seed: the config's root and splits, the row's objective and data."""
    from pipelines.curate import run_curate

    if row.get("score"):
        config = config.model_copy(update={"score": config.score.model_copy(update=row["score"])})
    train = {k: v for k, v in row.items() if k not in COMPARE_DATA_KEYS}
    values = {"train.name": f"compare_{name}_s{seed}", "train.seed": seed, "train.epoch_checkpoints": False, "train.folds": 1,
              "train.epochs": 1000, **{f"train.{k}": v for k, v in {**budget, **train}.items() if k != "unpaired"}}
    for key, value in row.get("unpaired", {}).items():
        values[f"train.unpaired.{key}"] = value
    if row.get("curate"):
        kept = join(config.root, "compare_curated", name)
        policy = load_config(None, [f"root={config.root}", f"curate.output={kept}"], {"curate.policy": row["curate"]})
        run_curate(config.model_copy(update={"curate": policy.curate}), export=False)
        values["train.keep_list"] = join(kept, "keep.parquet")
    export = (read_json(join(config.curate_dir(), "_summary.json"), {}) or {}).get("export")
    if (row.get("pairs") == "curated" or row.get("pools")) and not export:
        raise ConfigError(f"compare row {name}: needs the curate stage's export (curate.export: true)")
    if row.get("pairs") == "curated":
        values["train.shards"] = export["shards"]["urls"]
    if row.get("pools"):
        values["train.unpaired.images"] = export["unpaired_images"]["urls"]
        values["train.unpaired.texts"] = export["unpaired_texts"]["urls"]
    data = config.model_dump(mode="json")
    data["train"] = {**data["train"], "output": None, "pretrained": None, "loss_args": {}, "keep_list": None}
    for key, value in values.items():
        set_key(data, key, value)
    return validate(data, f"compare row {name}")


def run_row(config: Config, name: str, row: dict, seed: int, budget: dict) -> dict:
    from pipelines.evaluate import evaluate_checkpoint
    from pipelines.train import run_train

    cfg = row_config(config, name, row, seed, budget)
    summary = run_train(cfg)
    with fsspec.open(join(cfg.run_dir(), "metrics.jsonl"), "r") as f:
        metrics = [json.loads(line) for line in f.read().splitlines()]
    resolved = load_config(join(cfg.run_dir(), "_config.yaml")).train  # as trained: its shards, scores, teacher tau_s
    curve = [{"step": m["step"], "val_recall@1": m["val_recall@1"]} for m in metrics if "val_recall@1" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    result = evaluate_checkpoint(cfg, join(cfg.run_dir(), "checkpoints", "best.pt"))
    return {"row": name, "seed": seed, "train": resolved.model_dump(mode="json"), "steps": summary["steps"],
            "best_val_recall": summary["best_val_recall"], "val_curve": curve,
            "loss_first": float(np.mean(losses[:5])) if losses else None,
            "loss_last": float(np.mean(losses[-5:])) if losses else None, "test": result}


def evaluate_teacher(config: Config, out: str) -> dict | None:
    """The train stage's own run (the teacher) evaluated beside the students, when it exists."""
    from pipelines.evaluate import evaluate_checkpoint

    best = join(config.run_dir(), "checkpoints", "best.pt")
    if not exists(best):
        return None
    result = read_json(join(out, "teacher.json"))
    if result is None:
        run = read_json(join(config.run_dir(), "_summary.json"), {}) or {}
        result = {"row": f"teacher ({config.train.name}, {config.train.loss})", "seed": config.seed,
                  "best_val_recall": run.get("best_val_recall", float("nan")), "test": evaluate_checkpoint(config, best)}
        write_json(join(out, "teacher.json"), result)
    return result


def detection(config: Config) -> dict | None:
    summary = read_json(join(config.score_dir(), "_summary.json"), {}) or {}
    if not summary.get("detection"):
        return None
    return {**summary["detection"], "temperature_indicator": summary["noise"]["temperature_indicator"]}


def headline(result: dict) -> dict:
    """The numbers of one run that go into the table."""
    test = result["test"]
    out = {}
    for space in ("dot", "dn"):
        for task, scores in test["zero_shot"].items():
            out[f"{task} top1 {space}"] = scores[space]["top1"]
        if "retrieval" in test:
            r = test["retrieval"][space]
            out[f"R@1 {space}"] = (r["i2t_R@1"] + r["t2i_R@1"]) / 2
    out["best val R@1"] = result["best_val_recall"]
    return out


def summarize(results: list[dict]) -> dict:
    """Row -> column -> {mean, std, seeds} (std over seeds, population)."""
    rows: dict[str, list[dict]] = {}
    for result in results:
        rows.setdefault(result["row"], []).append(headline(result))
    return {name: {c: {"mean": float(np.mean([r[c] for r in runs])), "std": float(np.std([r[c] for r in runs])),
                       "seeds": len(runs)} for c in runs[0]} for name, runs in rows.items()}


def versus(results: list[dict], rows: dict, gap: dict | None = None) -> dict:
    """Each row against its baseline row and its DN against its dot product, paired by seed:
    row -> {baseline, gain (R@1 row - baseline, per seed), dn_gain (R@1 DN - dot, per seed)}; with
    gap = {raw: ROW, oracle: ROW}, also recovered = (row - raw) / (oracle - raw) per seed, the share of
    the damage noise does that the row wins back."""
    by = {(r["row"], r["seed"]): headline(r) for r in results}
    out = {}
    for name, row in rows.items():
        seeds = sorted(seed for (n, seed) in by if n == name)
        if not seeds or "R@1 dot" not in by[name, seeds[0]]:
            continue
        base = row.get("baseline")
        paired = [s for s in seeds if (base, s) in by]
        out[name] = {"baseline": base,
                     "gain": [by[name, s]["R@1 dot"] - by[base, s]["R@1 dot"] for s in paired] if base else [],
                     "dn_gain": [by[name, s]["R@1 dn"] - by[name, s]["R@1 dot"] for s in seeds]}
        if gap:
            out[name]["recovered"] = recovered(by, name, seeds, gap, "R@1 dot")
            if hard := hard_column(by[name, seeds[0]]):  # retrieval can saturate where an attribute still separates
                out[name]["recovered_hard"] = recovered(by, name, seeds, gap, hard)
    return out


def hard_column(numbers: dict) -> str | None:
    """The zero-shot column of the attribute a world's students must learn beyond colour (shape, pattern)."""
    return next((f"{h} top1 dot" for h in ("shape", "pattern") if f"{h} top1 dot" in numbers), None)


MIN_GAP = 0.02  # an oracle this little above raw (2 of 100 test items) is level with it: no share of it is reported


def recovered(by: dict, name: str, seeds: list[int], gap: dict, column: str) -> list[float]:
    """(row - raw) / (oracle - raw) in `column` per seed, on the seeds where the oracle is at least MIN_GAP above
    raw: elsewhere there is no damage to win back (and a share of a level gap would be a ratio of noise)."""
    raw, oracle = gap["raw"], gap["oracle"]
    ends = [s for s in seeds if (raw, s) in by and (oracle, s) in by and by[oracle, s][column] - by[raw, s][column] >= MIN_GAP]
    return [(by[name, s][column] - by[raw, s][column]) / (by[oracle, s][column] - by[raw, s][column]) for s in ends]


def spread(values: list[float]) -> str:
    """mean +- std (n>0 of n): the sign of each paired difference counts, not only the mean."""
    if not values:
        return ""
    wins = sum(v > 0 for v in values)
    return f"{np.mean(values):+.3f} +- {np.std(values):.3f} ({wins}/{len(values)} > 0)"


def share(values: list[float]) -> str:
    """A fraction of the gap as mean +- std percent over the seeds that had a gap (how many: in brackets)."""
    if not values:
        return f"no gap (oracle - raw < {MIN_GAP})"
    return f"{100 * np.mean(values):.0f}% +- {100 * np.std(values):.0f}% ({len(values)})"


def table(title: str, results: list[dict], detection: dict | None, rows_spec: dict | None = None,
          gap: dict | None = None) -> str:
    """Markdown: one line per row, mean +- std over its seeds; with the rows' spec, a second table of
    each row's gain over its baseline and of DN over dot, paired by seed (and with gap, the share of the
    raw -> oracle gap each row recovers)."""
    rows = summarize(results)
    lines = [f"### {title}", ""]
    if detection:
        lines += ["noise detection (AUROC against the labels table): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in detection["auroc"].items())
                  + f"; temperature indicator {detection['temperature_indicator']:.3g}", ""]
    if not rows:
        return "\n".join(lines + ["(no runs)"]) + "\n"
    columns = list(next(iter(rows.values())))
    lines += ["| row | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = [("" if c not in row else f"{row[c]['mean']:.3f}" if row[c]["seeds"] == 1
                  else f"{row[c]['mean']:.3f} +- {row[c]['std']:.3f}") for c in columns]
        lines.append(f"| {name} | {next(iter(row.values()))['seeds']} | " + " | ".join(cells) + " |")
    gains = versus(results, rows_spec or {}, gap)
    if gains:
        recovered = (f" | gap recovered ({gap['raw']} -> {gap['oracle']}) | gap recovered, hard attribute zero-shot"
                     if gap else "")
        lines += ["", "retrieval R@1 (dot) gained over the row's baseline, and by DN over dot, paired by seed "
                  "(mean +- std, seeds with a gain)" + (f"; the gap recovered over the seeds whose oracle is at least "
                  f"{MIN_GAP} above raw (how many)" if gap else "") + ":", "",
                  f"| row | baseline | R@1 gain over baseline | R@1 gain DN - dot{recovered} |",
                  "|---|---|---|---|" + ("---|---|" if gap else "")]
        lines += [f"| {name} | {g['baseline'] or ''} | {spread(g['gain'])} | {spread(g['dn_gain'])}"
                  + (f" | {share(g['recovered'])} | {share(g.get('recovered_hard', []))}" if gap else "") + " |"
                  for name, g in gains.items()]
    return "\n".join(lines) + "\n"


def plot_curves(title: str, results: list[dict]) -> bytes:
    """Validation R@1 against step, one line per row (mean over its seeds), a panel per loss family,
    the CLIP baseline (clip_raw) dashed on every panel."""
    from curate.report import figure, png

    curves: dict[str, list] = {}
    for result in results:
        if result.get("val_curve"):
            curves.setdefault(result["row"], []).append(result["val_curve"])
    families = sorted({name.split("_")[0] for name in curves}) or ["(no runs)"]
    fig = figure(width=4.0 * len(families), height=3.2)
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]

    def mean_curve(runs):
        n = min(len(c) for c in runs)
        return [p["step"] for p in runs[0][:n]], np.mean([[p["val_recall@1"] for p in c[:n]] for c in runs], axis=0)

    for ax, family in zip(axes, families):
        for name, runs in curves.items():
            if name.split("_")[0] == family and name != "clip_raw":
                ax.plot(*mean_curve(runs), lw=1.5, label=name)
        if "clip_raw" in curves:
            ax.plot(*mean_curve(curves["clip_raw"]), color="black", lw=1.2, ls="--", label="clip_raw")
        ax.set_title(f"{title}: {family}", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("clean validation R@1")
    return png(fig)
