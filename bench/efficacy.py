"""The efficacy table: does each method beat its baseline on noisy data?

    python bench/efficacy.py configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml   # the full run
    python bench/efficacy.py --smoke                                                        # CI's reduced run
    python bench/efficacy.py --tables-only ...                                              # table what exists

For each world config: its chain (world, shards, teacher, scores, audit, curation) runs first, then
every row of configs/efficacy/rows.yaml for every seed, with the same budget, as the compare stage
trains and evaluates its rows (pipelines/compare.py); a row's result
(its validation curve, the test metrics of its best-validation checkpoint, dot and DN) is written
to docs/results/efficacy/<world>/<row>_s<seed>.json and skipped when it exists, so the full run
can be spread over several sessions. The table (mean +- std over seeds) goes to
docs/results/efficacy/<world>/<rows file>.md (rows.md, sweep.md) and is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.cli import STAGES  # noqa: E402
from pipelines.compare import detection, plot_curves, run_once, spread, summarize, table, versus  # noqa: E402
from pipelines.config import load_config  # noqa: E402

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


def across(by_world: dict[str, list[dict]], rows: dict) -> str:
    """One line per row: its retrieval R@1 and its gain over its baseline in every world, side by side."""
    head = "| row | baseline | " + " | ".join(f"{w}: R@1 dot | {w}: gain over baseline" for w in by_world) + " |"
    lines = ["### retrieval R@1 by world (mean +- std over seeds; gain paired by seed)", "", head,
             "|---|---|" + "---|---|" * len(by_world)]
    tables = {w: (summarize(results), versus(results, rows)) for w, results in by_world.items()}
    for name, row in rows.items():
        cells = []
        for summary, gains in tables.values():
            r = summary.get(name, {}).get("R@1 dot")
            cells += ["" if r is None else f"{r['mean']:.3f} +- {r['std']:.3f} ({r['seeds']})",
                      spread(gains.get(name, {}).get("gain", []))]
        lines.append(f"| {name} | {row.get('baseline') or ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def refresh(doc: Path, results_dir: Path) -> None:
    """Replace each `<!-- table FILE -->...<!-- end table -->` block of a document with the table in
    results_dir/FILE (its title and detection line dropped: the document has its own)."""
    def body(match):
        lines = (results_dir / match[1]).read_text().splitlines()
        kept = [line for line in lines if not line.startswith(("### ", "noise detection"))]
        return f"<!-- table {match[1]} -->\n" + "\n".join(kept).strip() + "\n<!-- end table -->"
    doc.write_text(re.sub(r"<!-- table (\S+) -->.*?<!-- end table -->", body, doc.read_text(), flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/efficacy/noise20.yaml", "configs/efficacy/noise40.yaml"])
    parser.add_argument("--rows", default="configs/efficacy/rows.yaml")
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds of rows.yaml")
    parser.add_argument("--tables-only", action="store_true", help="only table the results already written")
    parser.add_argument("--doc", help="refresh the tables of this document (docs/RESULTS.md) from the results")
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
    load = (lambda path: load_config(path, overrides)) if args.tables_only else (lambda path: prepare_world(path, overrides))
    worlds = {Path(path).stem: load(path) for path in args.configs}
    # seed-major, so that a run stopped part-way has every row and world at the first seeds
    for seed in [] if args.tables_only else seeds:
        for world, config in worlds.items():
            for name, row in rows.items():
                run_once(config, name, row, seed, budget, str(results_dir / world))
    by_world = {}
    for world, config in worlds.items():
        out = results_dir / world
        out.mkdir(parents=True, exist_ok=True)
        results = by_world[world] = [json.loads((out / f"{name}_s{seed}.json").read_text())
                                     for name in rows for seed in seeds if (out / f"{name}_s{seed}.json").exists()]
        text = table(world, results, detection(config), rows)
        (out / f"{Path(args.rows).stem}.md").write_text(text)
        if results:
            (out / f"{Path(args.rows).stem}_curves.png").write_bytes(plot_curves(world, results))
        print("\n" + text)
    if len(by_world) > 1:
        text = across(by_world, rows)
        (results_dir / f"{Path(args.rows).stem}.md").write_text(text)
        print("\n" + text)
    if args.doc:
        refresh(Path(args.doc), results_dir)
    if tmp:
        print(f"smoke run: {tmp}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:  # a stopped row keeps its checkpoint: the same command resumes it
        sys.exit(f"efficacy: {stop or 'interrupted'}; re-run the same command to resume")
