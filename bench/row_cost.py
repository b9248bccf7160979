"""What an efficacy row costs, by how the rows share the machine: one process with torch's threads and
loader workers against two single-threaded processes side by side.

Each layout trains the efficacy student (configs/efficacy/noise20.yaml's train stage, rows.yaml's
budget) for --steps steps on a small world of the same generator; the layouts alternate for --rounds
rounds, and each round's rows-per-hour ratio against the first layout is printed (a ratio within one
round, as the machine's load drifts between rounds).

    .venv/bin/python bench/row_cost.py [--steps 160] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "efficacy" / "noise20.yaml")
# (name, processes side by side, loader workers, torch threads)
LAYOUTS = [("1 process, 2 threads, 2 loader workers", 1, 2, 2),
           ("1 process, 2 threads, no loader workers", 1, 0, 2),
           ("2 processes, 1 thread each, no loader workers", 2, 0, 1)]


def softcurate(root: str, *settings: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", CONFIG, "--root", root, "--set", "world.n_train=3000",
            *[arg for s in settings for arg in ("--set", s)]]


def rows_per_hour(root: str, steps: int, processes: int, workers: int, threads: int, tag: str) -> float:
    start = time.perf_counter()
    runs = [subprocess.Popen(softcurate(root, "stages=[train]", f"train.max_steps={steps}", f"train.workers={workers}",
                                        f"train.threads={threads}", f"train.name=cost_{tag}_{p}"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for p in range(processes)]
    for run in runs:
        if run.wait() != 0:
            sys.exit(f"row_cost: a training run failed:\n{run.stderr.read()[-2000:]}")
    return processes * 3600 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160, help="steps a row (the table's rows take 1,200)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="row-cost-") as root:
        subprocess.run(softcurate(root, "stages=[world,shard]"), cwd=ROOT, check=True, capture_output=True)
        ratios = {name: [] for name, *_ in LAYOUTS}
        for r in range(args.rounds):
            rates = [rows_per_hour(root, args.steps, p, w, t, f"{r}{i}") for i, (_, p, w, t) in enumerate(LAYOUTS)]
            for (name, *_), rate in zip(LAYOUTS, rates):
                ratios[name].append(rate / rates[0])
                print(f"round {r}: {name}: {rate:.0f} rows/h of {args.steps} steps ({rate / rates[0]:.2f}x)")
    print(f"\n{args.steps}-step rows, rows per hour against the first layout (median over {args.rounds} rounds):")
    for name, values in ratios.items():
        print(f"  {name:<48} {statistics.median(values):.2f}x")


if __name__ == "__main__":
    main()
