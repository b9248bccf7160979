"""Shard-stage benchmark: `softcurate shard` against the plain `img2dataset` command, same list.

Both shard the same loopback url list (the demo world, no failing urls) with the same processes,
threads, image size and shard size; runs alternate so machine noise hits both alike. Prints
images/s for each, their ratio, and softcurate's peak memory (whole process tree) at 1x and 4x.

    .venv/bin/python bench/shard.py [--n 5000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.config import WorldConfig  # noqa: E402
from pipelines.world import build_world, write_url_list  # noqa: E402
from pipelines.world_server import serve_world  # noqa: E402

BIN = Path(sys.executable).parent
SETTINGS = {"processes": 2, "threads": 32, "image_size": 64, "samples_per_shard": 1000}


def peak_rss(proc: subprocess.Popen, stop: threading.Event, out: list) -> None:
    """Sample the summed RSS of a process and all its descendants (Dask workers included)."""
    peak = 0
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out.append(peak)


def timed(cmd: list[str], out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)  # a fresh output each run (img2dataset's own overwrite mode is broken)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_rss, args=(proc, stop, peak))
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return seconds, peak[0]


def softcurate_cmd(urls: Path, out: Path) -> list[str]:
    s = SETTINGS
    return [str(BIN / "softcurate"), "shard", "--input", str(urls), "--format", "cc12m", "--root", str(out),
            "--processes", str(s["processes"]), "--threads", str(s["threads"]), "--image-size", str(s["image_size"]),
            "--samples-per-shard", str(s["samples_per_shard"]), "--allow-private-urls"]  # the world is on loopback


def img2dataset_cmd(urls: Path, out: Path) -> list[str]:
    s = SETTINGS
    return [str(BIN / "img2dataset"), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
            "--processes_count", str(s["processes"]), "--thread_count", str(s["threads"]),
            "--image_size", str(s["image_size"]), "--number_sample_per_shard", str(s["samples_per_shard"]),
            "--resize_mode", "border", "--compute_hash", "sha256", "--extract_exif", "False", "--enable_wandb", "False"]


def count_successes(folder: Path) -> int:
    import polars as pl

    files = sorted(folder.rglob("0*.parquet"))
    return int(pl.concat([pl.read_parquet(f, columns=["status"]) for f in files])["status"].eq("success").sum())


def world(tmp: Path, n: int) -> Path:
    cfg = WorldConfig(n_train=n, n_val=0, n_test=0, image_size=64,
                      failing_urls={"http_404": 0, "http_500": 0, "timeout": 0, "truncated": 0, "html": 0})
    build_world(cfg, str(tmp / f"world{n}"), seed=0)
    return tmp / f"world{n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        small, large = world(tmp, args.n), world(tmp, 4 * args.n)
        rates: dict[str, list[float]] = {"softcurate": [], "img2dataset": []}
        peaks: dict[str, int] = {}
        with serve_world(str(small)) as base_small, serve_world(str(large)) as base_large:
            tsv, parquet = write_url_list(str(small), base_small)
            for r in range(args.rounds):
                for name, cmd, out in (("softcurate", softcurate_cmd(Path(tsv), tmp / "sc"), tmp / "sc"),
                                       ("img2dataset", img2dataset_cmd(Path(parquet), tmp / "i2d"), tmp / "i2d")):
                    seconds, peak = timed(cmd, out)
                    done = count_successes(out)
                    assert done == args.n, f"{name} stored {done} of {args.n} images"
                    rates[name].append(done / seconds)
                    peaks[f"{name} 1x"] = max(peaks.get(f"{name} 1x", 0), peak)
                    print(f"round {r + 1}: {name:<11} {seconds:6.2f} s  {done / seconds:8.1f} images/s  "
                          f"peak {peak / 2**20:7.0f} MiB", flush=True)
            tsv4, _ = write_url_list(str(large), base_large)
            seconds, peak = timed(softcurate_cmd(Path(tsv4), tmp / "sc4"), tmp / "sc4")
            peaks["softcurate 4x"] = peak
            print(f"4x list: softcurate {seconds:6.2f} s  {4 * args.n / seconds:8.1f} images/s  "
                  f"peak {peak / 2**20:7.0f} MiB", flush=True)
        sc, i2d = statistics.median(rates["softcurate"]), statistics.median(rates["img2dataset"])
        print(f"\nsettings: {SETTINGS}, {args.n} images, {args.rounds} alternating rounds, median of rounds")
        print(f"softcurate shard   {sc:8.1f} images/s")
        print(f"img2dataset (mp)   {i2d:8.1f} images/s")
        print(f"ratio              {sc / i2d:8.2f}   (target >= 0.9)")
        print(f"peak memory 1x     {peaks['softcurate 1x'] / 2**20:8.0f} MiB  (img2dataset {peaks['img2dataset 1x'] / 2**20:.0f} MiB)")
        print(f"peak memory 4x     {peaks['softcurate 4x'] / 2**20:8.0f} MiB  "
              f"(ratio {peaks['softcurate 4x'] / peaks['softcurate 1x']:.2f}, target flat)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
