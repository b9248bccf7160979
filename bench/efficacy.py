"""The efficacy table: does each method beat its baseline on noisy data, and how much of the damage
noise does (raw -> oracle) does it win back?

    python bench/efficacy.py configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml   # the full run
    python bench/efficacy.py --smoke                                                        # CI's reduced run
    python bench/efficacy.py --tables-only ...                                              # table what exists

First the teachers of `teachers:` in the rows file (a config each: a separate world and its train
stage, e.g. configs/efficacy/teacher.yaml), then for each world config its chain (world, shards,
self-taught teacher, scores, audit, curation) and the scores of every other teacher
(<root>/scores_<teacher>), and the oracle shards: the same images with their true captions, made
here from the world's truth table (nothing else ever reads the truth to decide anything). Then every
row of the rows file for every seed, with the same budget, as the compare stage trains and evaluates
its rows (pipelines/compare.py). A row with `teachers: [self, pretrained]` runs once per teacher
(named ROW and ROW_pretrained); `pairs: oracle` trains on the oracle shards, `pairs: oracle_full` on
those whose true caption is a full one (the ceiling without the captions that fit many images). A row's result is
written to <results>/<world>/<row>_s<seed>.json (--results, default docs/results/efficacy) and skipped when it exists, so the run
can be spread over several sessions. What every row reads (the scores of each teacher, so the teachers too) is
rebuilt by each session's chain: a build. Builds are seeded and identical on one CPU model, but torch's CPU
kernels round differently on another and the teachers' training diverges, so a seed is a replicate of the
whole chain: <results>/<world>/inputs.json lists each build (its digests, machine, commit, detection) and the
seeds it claimed (at the seed's first row). A seed claimed by another build is not trained here: one seed's rows
never mix two builds, and the spread over seeds includes the teacher's.

On 2 cores, rows run fastest as two single-threaded processes (configs/efficacy: workers 0, threads 1);
processes started with --rows-only share the rows (each takes the next one no other process holds):

    python bench/efficacy.py CONFIGS --prepare-only                         # teachers, worlds, scores
    python bench/efficacy.py CONFIGS --rows-only & python bench/efficacy.py CONFIGS --rows-only

bench/efficacy_lanes.sh does the whole table that way (teachers beside worlds, then rows in two lanes).

The table (mean +- std over seeds, gains paired by seed, the
share of the raw -> oracle gap recovered) goes to <results>/<world>/<rows file>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
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
from pipelines.config import Config, join, load_config  # noqa: E402
from pipelines.io import atomic_open, finished_shards, read_json, write_json  # noqa: E402
from pipelines.score import detection_rows, run_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "efficacy"
ORACLE, ORACLE_FULL = "oracle", "oracle_full"  # `pairs:` of the rows the truth table feeds
SELF = "self"  # the teacher each world trains on its own noisy pairs (its chain's train stage)
SMOKE = {"world": ["world.n_train=300", "world.n_val=60", "world.n_test=60", "shard.samples_per_shard=150",
                   "train.epochs=2", "train.batch_size=32", "curate.samples_per_shard=150"],
         "teacher": ["world.n_train=400", "world.n_val=60", "world.n_test=0", "shard.samples_per_shard=200",
                     "train.epochs=1", "train.batch_size=32"],
         "rows": ["clip_raw", "clip_oracle", "clip_curated_cosine_top", "softclip_teacher"],
         "budget": {"max_steps": 12, "batch_size": 32, "warmup_steps": 2, "workers": 1, "checkpoint_every": 100, "log_every": 1}}


def prepare_world(config_path: str, overrides: list[str]) -> Config:
    """The world's chain (each stage resumes or skips what is done)."""
    config = load_config(config_path, overrides)
    for stage in config.stages:
        STAGES[stage](config)
    return config


def teacher_scores(config: Config, name: str, teacher: Config) -> dict:
    """The score settings under which `teacher` (a config whose train stage ran) scores `config`'s shards."""
    return {"output": join(config.root, f"scores_{name}"), "model": teacher.train.model,
            "checkpoints": [join(teacher.run_dir(), "checkpoints", "best.pt")]}


def expand_rows(rows: dict, scores: dict[str, dict]) -> dict:
    """A row with `teachers: [...]` becomes one row per teacher (ROW for self, ROW_<teacher> for the others,
    each reading that teacher's scores); a baseline that was expanded too is followed to its same-teacher row."""
    expanded = {}
    for name, row in rows.items():
        row = dict(row)
        for teacher in row.pop("teachers", [SELF]):
            named = name if teacher == SELF else f"{name}_{teacher}"
            base = row.get("baseline")
            if base and teacher != SELF and teacher in rows.get(base, {}).get("teachers", []):
                base = f"{base}_{teacher}"
            expanded[named] = {**row, **({"baseline": base} if base else {}),
                               **({"score": scores[teacher]} if teacher != SELF else {})}
    return expanded


def oracle_shards(config: Config, kind: str = ORACLE) -> str:
    """The shard stage's shards with every caption replaced by the pair's true one (the world's truth
    table's clean_caption, by url-list row): the ceiling's training data, for this benchmark only.
    ORACLE_FULL keeps only the pairs whose true caption is a full one (truth `partial` false)."""
    import webdataset as wds

    from pipelines.world import world_truth

    truth = world_truth(config, ("row", "clean_caption", "partial"))
    true_caption = dict(zip(truth["row"].to_list(), truth["clean_caption"].to_list()))
    dropped = set(truth.filter(truth["partial"])["row"].to_list()) if kind == ORACLE_FULL else set()
    out = Path(config.root) / kind / "shards"
    out.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in finished_shards(config):
        name = Path(shard).name
        stats = out / name.replace(".tar", "_stats.json")
        urls.append(str(out / name))
        if stats.exists():  # written after its tar
            continue
        kept = 0
        with atomic_open(str(out / name)) as f, wds.TarWriter(f, mtime=0) as sink:
            for sample in wds.WebDataset(shard, shardshuffle=False):
                row = json.loads(sample["json"])["row"]
                if row in dropped:
                    continue
                sink.write({**{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"},
                            "txt": true_caption[row].encode()})
                kept += 1
        write_json(str(stats), {**read_json(shard.removesuffix(".tar") + "_stats.json"), "count": kept, "successes": kept})
    return "::".join(urls)


def with_oracle_shards(plan: dict, shards) -> dict:
    """The rows with `pairs: oracle` / `oracle_full` training on `shards(kind)` (made once per kind)."""
    oracles = {kind: shards(kind) for kind in {row.get("pairs") for row in plan.values()} & {ORACLE, ORACLE_FULL}}
    return {n: ({**{k: v for k, v in r.items() if k != "pairs"}, "shards": oracles[r["pairs"]]}
                if r.get("pairs") in oracles else r) for n, r in plan.items()}


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
        if not (results_dir / match[1]).exists():  # that world or rows file has not been tabled yet
            return f"<!-- table {match[1]} -->\n(no results yet)\n<!-- end table -->"
        lines = (results_dir / match[1]).read_text().splitlines()
        kept = [line for line in lines if not line.startswith(("### ", "noise detection"))]
        return f"<!-- table {match[1]} -->\n" + "\n".join(kept).strip() + "\n<!-- end table -->"
    doc.write_text(re.sub(r"<!-- table (\S+) -->.*?<!-- end table -->", body, doc.read_text(), flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/efficacy/noise20.yaml", "configs/efficacy/noise40.yaml"])
    parser.add_argument("--rows", default="configs/efficacy/rows.yaml")
    parser.add_argument("--only", nargs="*", help="run only these rows (names after expansion, e.g. softclip_teacher_pretrained)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds of the rows file")
    parser.add_argument("--tables-only", action="store_true", help="only table the results already written")
    parser.add_argument("--prepare-only", action="store_true", help="build the teachers, worlds and scores; train no row")
    parser.add_argument("--rows-only", action="store_true",
                        help="train the rows of a prepared run; several such processes share the rows")
    parser.add_argument("--doc", help="refresh the tables of this document (docs/RESULTS.md) from the results")
    parser.add_argument("--smoke", action="store_true", help="a tiny world, one seed, four rows, a few steps (CI)")
    parser.add_argument("--results", default=None, help=f"default {RESULTS.relative_to(ROOT)} (smoke: a temporary folder)")
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.rows).read_text())
    seeds, budget, rows, gap = spec["seeds"], spec["budget"], spec["rows"], spec.get("gap")
    teachers = spec.get("teachers", {})
    overrides, teacher_overrides, results_dir, tmp = [], [], Path(args.results or RESULTS), None
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="efficacy-smoke-")
        args.configs, seeds, budget = args.configs[:1], [0], {**budget, **SMOKE["budget"]}
        rows = {k: rows[k] for k in SMOKE["rows"]}
        overrides = [f"root={tmp}/world", *SMOKE["world"]]
        teacher_overrides = [f"root={tmp}/teacher", *SMOKE["teacher"]]
        results_dir = Path(args.results) if args.results else Path(tmp) / "results"
    prepare = not (args.tables_only or args.rows_only)
    load = prepare_world if prepare else (lambda path, extra: load_config(path, extra))
    trained = {name: load(t["config"], teacher_overrides) for name, t in teachers.items()}
    worlds = {Path(path).stem: load(path, overrides) for path in args.configs}
    plans, builds = {}, {}
    for world, config in worlds.items():
        scores = {name: teacher_scores(config, name, teacher) for name, teacher in trained.items()}
        plan = expand_rows(rows, scores)
        if prepare:
            for name, settings in scores.items():  # every teacher scores this world's shards once
                run_score(config.model_copy(update={"score": config.score.model_copy(update=settings)}))
        if not args.tables_only:
            digests = input_digests(config, scores)
            if missing := sorted({SELF, *trained} - {k.split("/")[0] for k in digests}):
                sys.exit(f"efficacy: {world} is not prepared (no scores of {', '.join(missing)}); run with --prepare-only first")
            builds[world] = {"scores": digests, "detection": detections(config, trained)}
            plan = with_oracle_shards(plan, lambda kind: oracle_shards(config, kind))
        plans[world] = {n: r for n, r in plan.items() if not args.only or n in args.only}
    seeds = args.seeds or seeds
    # seed-major, so that a run stopped part-way has every row and world at the first seeds
    jobs = [(seed, world, name) for seed in seeds for world in worlds for name in plans[world]]
    for seed, world, name in [] if args.tables_only or args.prepare_only else jobs:
        path = results_dir / world / f"{name}_s{seed}.json"
        with held(path.with_suffix(".lock")) as mine:
            if not mine:  # another process is training it
                continue
            fresh = not path.exists()
            if fresh and not claim(results_dir / world, seed, builds[world]):
                continue
            result = run_once(worlds[world], name, plans[world][name], seed, budget, str(results_dir / world))
            if fresh:  # which code and machine trained it: runs spread over sessions must not mix them unseen
                write_json(str(path), {**result, "commit": commit(), "machine": machine()})
    by_world = {}
    for world, config in worlds.items():
        out = results_dir / world
        out.mkdir(parents=True, exist_ok=True)
        plan = plans[world]
        results = by_world[world] = [json.loads((out / f"{name}_s{seed}.json").read_text())
                                     for name in plan for seed in seeds if (out / f"{name}_s{seed}.json").exists()]
        text = table(world, results, detection(config), plan, gap)
        (out / f"{Path(args.rows).stem}.md").write_text(text)
        (out / "detection.md").write_text(builds_table(read_json(str(out / "inputs.json"), {}) or {}))
        if results:
            (out / f"{Path(args.rows).stem}_curves.png").write_bytes(plot_curves(world, results))
        print("\n" + text)
    if len(by_world) > 1:
        text = across(by_world, next(iter(plans.values())))
        (results_dir / f"{Path(args.rows).stem}.md").write_text(text)
        print("\n" + text)
    if args.doc:
        refresh(Path(args.doc), results_dir)
    if tmp:
        print(f"smoke run: {tmp}")
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def held(lock: Path):
    """Whether this process holds `lock` (flock: released when the process ends, however it ends)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def input_digests(config: Config, scores: dict[str, dict]) -> dict[str, str]:
    """sha256 of each teacher's per-shard scores (the keep-lists, soft targets and clean_prob every row reads)."""
    folders = {SELF: config.score_dir(), **{name: settings["output"] for name, settings in scores.items()}}
    return {f"{name}/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
            for name, folder in folders.items() for path in sorted(Path(folder).glob("*.parquet"))}


def claim(out: Path, seed: int, build: dict) -> bool:
    """Whether this machine's build may train `seed`: no other build claimed it (it claims it now) or this one did."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "inputs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the lanes claim one at a time
        builds = (read_json(str(out / "inputs.json"), {}) or {}).get("builds", [])
        owner = next((b for b in builds if seed in b["seeds"]), None)
        if owner is not None and owner["scores"] != build["scores"]:
            print(f"efficacy: {out.name} seed {seed} was trained on another build of its inputs ({owner['machine']}); "
                  f"its rows cannot resume here: finish them on a machine that rebuilds the same scores, or delete "
                  f"{out.name}/*_s{seed}.json to train the seed again", file=sys.stderr)
            return False
        if owner is None:
            mine = next((b for b in builds if b["scores"] == build["scores"]), None)
            if mine is None:
                builds.append(mine := {"seeds": [], "machine": machine(), "commit": commit(), **build})
            mine["seeds"] = sorted({*mine["seeds"], seed})
            write_json(str(out / "inputs.json"), {"builds": builds})
        return True


def machine() -> str:
    """The CPU model and torch version: what decides how the teachers' and rows' floats round."""
    import platform

    import torch

    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
                if line.startswith("model name")), platform.processor())
    return f"{cpu or platform.machine()}, torch {torch.__version__}"


def commit() -> str:
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


def detections(config: Config, trained: dict[str, Config]) -> dict:
    """Each teacher's detection on this world (from its score summary, when the scores are here)."""
    found = {}
    for name in [SELF, *trained]:
        folder = config.score_dir() if name == SELF else join(config.root, f"scores_{name}")
        summary = read_json(join(folder, "_summary.json"), {}) or {}
        if summary.get("detection"):
            teacher = summary["teacher"]
            epochs = teacher.get("epochs") or []
            averaged = [epochs[j] if epochs else j for j in teacher["averaged"]]
            found[name] = {"model": teacher["model"], "loss_rule": teacher["loss_rule"], "loss_averaged_over": averaged,
                           **summary["detection"]}
    return found


def detection_table(found: dict) -> str:
    """Noise detection by each teacher, overall and by kind of noise: the AUROC of each score against the
    truth, the share clean_prob < 0.5 flags, the estimated noise rate beside the injected one."""
    lines = []
    for name, d in found.items():
        rate, averaged = d["noise_rate"], d["loss_averaged_over"]
        scored = ("each pair's loss from the fold teacher that never trained on it" if d["loss_rule"] == "held_out"
                  else f"loss averaged over epochs {', '.join(map(str, averaged))} ({d['loss_rule']})" if len(averaged) > 1
                  else "loss of its best checkpoint")
        lines += ["", f"**{name} teacher** ({d['model']}; {scored}): estimated noise rate "
                      f"{rate['estimated']:.3f} against {rate['labelled']:.3f} injected; "
                      f"{d['clean_flagged']:.1%} of the clean pairs flagged (clean_prob < 0.5)", "",
                  "| noise | pairs | flagged | AUROC clean_prob | AUROC loss | AUROC cosine | AUROC DN |",
                  "|---|---|---|---|---|---|---|"]
        for kind, pairs, flagged, a in detection_rows(d):
            lines.append(f"| {kind} | {pairs} | {'' if flagged is None else f'{flagged:.1%}'} | {a['clean_prob']:.3f} | "
                         f"{a['loss']:.3f} | {a['cosine']:.3f} | {a['dn_score']:.3f} |")
    return "\n".join(lines).strip() + "\n" if lines else "(no scores with a labels table)\n"


def builds_table(inputs: dict) -> str:
    """Each build's detection, headed by the seeds that read it and the machine that made it."""
    return "\n".join(f"**Build on {b['machine']}** (seeds: {', '.join(map(str, b['seeds'])) or 'none yet'})\n\n"
                     f"{detection_table(b['detection'])}" for b in inputs.get("builds", [])) or "(no scores yet)\n"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:  # a stopped row keeps its checkpoint: the same command resumes it
        sys.exit(f"efficacy: {stop or 'interrupted'}; re-run the same command to resume")
