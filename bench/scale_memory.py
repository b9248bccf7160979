"""Memory at scale: peak RSS of every driver-side step at 1M and 4M pairs, and a CC12M projection.

Synthetic inputs of each size, d = 512 (`--dim`), 10,000 pairs a shard:
- the score stage's `_embed` files: random clustered unit vectors, the text of a pair near its image
  (20% of a shard's texts shuffled), float16 as embed_shard writes them;
- scores/ and shards/ tables as bench/audit.py builds them (scalar scores, 16 neighbours a side);
- a CC12M-format url list (1% repeated urls), as bench/urllist.py writes it.

Each step runs alone in a fresh interpreter (`--child`); the parent samples the RSS of that process
and all its descendants (Dask workers, decode processes) every 0.2 s. "driver" is the child's own
high-water mark (exact), "tree" the sampled sum over the process tree (workers' mapped index pages
count in each worker that touched them; PSS shares each page among the processes mapping it;
"anonymous" leaves out file-backed pages, such as the index's mapped lists, which the kernel can drop
and read again: it is what must fit in memory). The steps:

    urls            the shard stage's reading and validation of the url list (no download)
    globals         score: DN means, bank and mixture from their seeded samples (pipelines.score.global_state)
    neighbours      score: both faiss indexes, shard by shard, and their recall (neighbour_index)
    score tasks     score: score_shard for the first --score-shards shards on 2 Dask workers (the rest
                    cost the same per shard; their seconds are extrapolated, not run)
    summary         score: the summary over every scores file (summarize)
    audit / curate  run_audit, run_curate (clean_prob), run_curate (clean_prob + image dedup)

    .venv/bin/python bench/scale_memory.py [--sizes 1000000 4000000] [--dim 512] [--factory IVF1024,SQ8]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose train.py is not the train package

PER_SHARD = 10_000
CC12M = 12_423_374
STEPS = ("urls", "globals", "neighbours", "score tasks", "summary", "audit", "curate", "curate + dedup")


# ---------------------------------------------------------------- inputs
def embed_files(folder: Path, n: int, dim: int, seed: int = 0) -> None:
    """The score stage's _embed files of n pairs: clustered images, each text near its image, 20% shuffled."""
    import pyarrow as pa

    from pipelines.io import write_table
    from pipelines.score_tasks import scatter

    folder.mkdir(parents=True)
    centres = np.random.default_rng(seed).standard_normal((max(1, round(n ** 0.5)), dim)).astype(np.float32)
    for shard, start in enumerate(range(0, n, PER_SHARD)):
        m = min(PER_SHARD, n - start)
        rng = np.random.default_rng([seed, shard])
        image = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), np.float32)
        text = image + 0.7 * rng.standard_normal((m, dim), np.float32)
        noisy = np.flatnonzero(rng.random(m) < 0.2)
        text[noisy] = text[rng.permutation(noisy)]
        keys = [f"{shard:05d}{i:04d}" for i in range(m)]
        write_table(str(folder / f"{shard:05d}.parquet"), pa.table({
            "key": pa.array(keys), "row": pa.array(np.arange(start, start + m)),
            "status": pa.array(["scored"] * m), "error": pa.array([None] * m, pa.string()),
            "image_emb_0": scatter([image], list(range(m)), m, dim), "text_emb_0": scatter([text], list(range(m)), m, dim)}))


def make_inputs(root: Path, n: int, dim: int, steps: list[str]) -> None:
    """What the steps read: embeddings and a teacher for the score steps, tables for the later ones, the url list."""
    from bench.audit import synthetic
    from bench.urllist import write_list
    from train.models import create_model, save_checkpoint

    if {"globals", "neighbours", "score tasks", "summary"} & set(steps):
        embed_files(root / "embed", n, dim)
        model = create_model("softcurate-tiny", None, "cpu")[0]  # the globals read its logit scale only
        save_checkpoint(model, root / "teacher.pt")
    if {"summary", "audit", "curate", "curate + dedup"} & set(steps):
        synthetic(root / "tables", n)
    if "urls" in steps:
        write_list(root / "list.tsv", n)


# ---------------------------------------------------------------- one step, in a child process
def run_step(step: str, root: Path, factory: str, score_shards: int) -> dict:
    from pipelines.config import load_config

    config = load_config(None, [f"root={root / 'tables'}", f"score.faiss_index={factory}"])
    cfg = config.score
    embeds = sorted(str(p) for p in (root / "embed").glob("*.parquet"))
    teacher = {"model": "softcurate-tiny", "checkpoints": [str(root / "teacher.pt")], "sentence_teacher": None,
               "device": "cpu", "loss_rule": "given", "epochs": None, "digests": ["synthetic"]}
    out = {}
    if step == "urls":
        from pipelines.urllist import validate_url_list

        with tempfile.TemporaryDirectory(dir=root) as work:
            out = validate_url_list(str(root / "list.tsv"), work, "cc12m")
            out.pop("digest")
    elif step == "globals":
        from pipelines.score import global_state

        state = global_state(embeds, teacher, cfg, config.seed)
        (root / "state.pkl").write_bytes(pickle.dumps(state))
        out = {"n_scored": state["n_scored"], "samples": state["sample_sizes"]}
    elif step == "neighbours":
        from pipelines.score import neighbour_index

        state = pickle.loads((root / "state.pkl").read_bytes())
        search = neighbour_index(embeds, str(root / "index"), state, cfg, config.seed)
        (root / "search.json").write_text(json.dumps(search))
        out = {k: search[k] for k in ("method", "factory", "image_recall", "text_recall") if k in search}
    elif step == "score tasks":
        from pipelines.distributor import dask_client
        from pipelines.score import run_tasks
        from pipelines.score_tasks import score_shard

        state = pickle.loads((root / "state.pkl").read_bytes())
        search = json.loads((root / "search.json").read_text())
        (root / "scored").mkdir(exist_ok=True)
        todo = embeds[:score_shards]
        with dask_client(None, 2) as client:
            shared = client.scatter(state, broadcast=True)
            done, failed = run_tasks(client, "score", [(score_shard, e, str(root / "scored" / Path(e).name), shared,
                                                         search, 1) for e in todo])
        assert not failed, failed
        out = {"shards": len(todo), "of": len(embeds), "task_seconds": round(sum(r["seconds"] for r in done), 1)}
    elif step == "summary":
        from pipelines.score import summarize

        state = pickle.loads((root / "state.pkl").read_bytes())
        search = json.loads((root / "search.json").read_text())
        paths = sorted(str(p) for p in (root / "tables" / "scores").glob("0*.parquet"))
        summary = summarize(config, paths, state, search, teacher, {}, {})
        out = summary["counts"]
    elif step in ("audit", "curate", "curate + dedup"):
        from pipelines.audit import run_audit
        from pipelines.curate import run_curate

        if step == "audit":
            run_audit(config)
        else:
            policy = ["curate.policy=[{kind: clean_prob, min: 0.5}, {kind: dedup, side: image, min_sim: 0.99}]"]
            summary = run_curate(load_config(None, [f"root={root / 'tables'}", *(policy if "dedup" in step else [])]),
                                 export=False)
            out = {"kept": summary.get("kept")}
    return out


def high_water_mib() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it starts afresh at exec, not at the forking parent's)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def child(step: str, root: str, factory: str, score_shards: int) -> None:
    started = time.perf_counter()
    out = run_step(step, Path(root), factory, score_shards)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "driver_mib": high_water_mib(), **out}))


def measured(step: str, root: Path, factory: str, score_shards: int) -> dict:
    """Run one step in a fresh interpreter; its output and the sampled peak RSS of its process tree."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, str(root), factory, str(score_shards)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top, peak = psutil.Process(proc.pid), {"tree_mib": 0, "tree_pss_mib": 0, "tree_anon_mib": 0}
    while proc.poll() is None:
        now = dict.fromkeys(peak, 0)
        for p in [top, *top.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:  # gone between the listing and the read
                continue
            now["tree_mib"] += info.rss
            now["tree_pss_mib"] += info.pss
            now["tree_anon_mib"] += info.rss - info.shared  # not file-backed: what must fit in memory
        peak = {k: max(v, now[k]) for k, v in peak.items()}
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{step} failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.splitlines()[-1]), **{k: round(v / 2**20) for k, v in peak.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--factory", default="IVF1024,SQ8",
                        help="the approximate index (the stage's default, auto, grows the lists with sqrt(n))")
    parser.add_argument("--score-shards", type=int, default=4, help="shards the score tasks run on")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--workdir", default=None, help="where the inputs go (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
    needs = {"neighbours": "globals", "score tasks": "neighbours", "summary": "neighbours"}
    for step in args.steps:  # a step reads what an earlier one left (the globals' state, the index)
        if step in needs and needs[step] not in args.steps:
            parser.error(f"--steps: {step!r} needs {needs[step]!r} too")
    results = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            root = Path(tmp)
            started = time.perf_counter()
            make_inputs(root, n, args.dim, args.steps)
            du = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**30
            print(f"{n:,} pairs: inputs {du:.1f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
            for step in args.steps:
                r = results[n, step] = measured(step, root, args.factory, args.score_shards)
                extra = {k: v for k, v in r.items() if not k.endswith("_mib") and k != "seconds"}
                print(f"{n:>10,}  {step:<15} {r['seconds']:>7.1f} s  driver {r['driver_mib']:>6,} MiB  "
                      f"tree {r['tree_mib']:>6,} MiB (PSS {r['tree_pss_mib']:>6,}, anonymous {r['tree_anon_mib']:>6,})  "
                      f"{json.dumps(extra)}", flush=True)
    small, large = min(args.sizes), max(args.sizes)
    if small == large:
        return
    print(f"\n{'step':<15} {'driver ratio':>13} {'tree anonymous':>15}   "
          "CC12M projection, linear in the growth: driver, tree anonymous")
    for step in args.steps:
        a, b = results[small, step], results[large, step]

        def cc12m(key):  # the larger size's figure plus its growth per pair (none if it shrank) times the pairs to go
            return (b[key] + max(0, b[key] - a[key]) / (large - small) * (CC12M - large)) / 1024
        print(f"{step:<15} {b['driver_mib'] / a['driver_mib']:>13.2f} {b['tree_anon_mib'] / a['tree_anon_mib']:>15.2f}   "
              f"{cc12m('driver_mib'):.1f} GiB, {cc12m('tree_anon_mib'):.1f} GiB")


if __name__ == "__main__":
    main()
