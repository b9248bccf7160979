"""Url-list benchmark: peak memory of reading and validating a synthetic CC12M list (no download).

Each measurement runs in a fresh process and reports that process's peak RSS: `memory` reads and
validates the whole list at once (read_url_list + validate_rows), `stream` is the shard stage's
validate_url_list (batches, duplicates found in spill partitions). 1% of the rows repeat an earlier url.

    .venv/bin/python bench/urllist.py [--rows 1000000 4000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_list(path: Path, rows: int) -> None:
    i = pl.int_range(rows, eager=True)
    url_id = pl.when(i % 100 == 99).then(i // 2).otherwise(i)  # a duplicate of an earlier row
    df = pl.DataFrame({"i": i}).select(
        url=pl.format("https://img{}.example.com/photos/{}.jpg", url_id % 1000, url_id),
        caption=pl.format("a photo of item {} on a table", i))
    df.write_csv(path, separator="\t", include_header=False, quote_style="never")


def measure(impl: str, path: str) -> dict:
    from pipelines.io import write_parquet
    from pipelines.urllist import read_url_list, validate_rows
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        if impl == "stream":
            from pipelines.urllist import validate_url_list
            counts = validate_url_list(path, workdir, "cc12m")
            valid = counts["valid"]
        else:
            ok, rejected = validate_rows(read_url_list(path, "cc12m"))
            write_parquet(f"{workdir}/_input.parquet", ok)
            write_parquet(f"{workdir}/_rejected.parquet", rejected)
            valid = ok.height
    return {"impl": impl, "valid": valid, "seconds": round(time.time() - started, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {}
        for rows in args.rows:
            path = Path(tmp) / f"list-{rows}.tsv"
            write_list(path, rows)
            for impl in ("memory", "stream"):
                out = subprocess.run([sys.executable, __file__, "--child", impl, str(path)], check=True,
                                     capture_output=True, text=True).stdout
                result = json.loads(out.splitlines()[-1])
                peaks[impl, rows] = result["peak_rss_mib"]
                print(f"{rows:>10,} rows  {impl:<6}  {result['peak_rss_mib']:>6,} MiB  {result['seconds']:>6} s  "
                      f"({result['valid']:,} valid, list {path.stat().st_size / 2**20:,.0f} MiB)", flush=True)
        small, large = min(args.rows), max(args.rows)
        for impl in ("memory", "stream"):
            print(f"{impl}: peak at {large:,} / at {small:,} rows = {peaks[impl, large] / peaks[impl, small]:.2f}")


if __name__ == "__main__":
    main()
