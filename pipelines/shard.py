"""The shard stage: a url list to WebDataset shards, img2dataset's reader and downloader on Dask.

    url list ─▶ read + validate (urllist) ─▶ _input.parquet ─▶ img2dataset Reader ─▶ input shards
             └▶ _rejected.parquet (a reason per row)            Downloader per shard on Dask ─▶ NNNNN.tar/.parquet/_stats.json

img2dataset writes a shard's samples in download-completion order, with the time in each tar header;
once it has finished a shard (its `_stats.json`, written last), the task rewrites the shard
canonically (tar members in key order with fixed headers, parquet rows sorted by key) and marks its
stats, so the same samples give the same bytes and everything downstream reads them in one order.
A shard is complete when its stats are marked and its counts match its parquet; a re-run skips
complete shards, finishes the rewrite of a shard that img2dataset finished, and redoes the rest.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tarfile
import tempfile
import time

import fsspec
import polars as pl
import pyarrow.parquet as pq
import webdataset as wds
from img2dataset.downloader import Downloader
from img2dataset.reader import Reader
from img2dataset.writer import WebDatasetSampleWriter

from pipelines.config import Config, ConfigError, join, save_config
from pipelines.distributor import dask_client, dask_distributor
from pipelines.fetch import REFUSED, BoundedResizer, PublicDownloader
from pipelines.io import (
    atomic_open,
    prepare_output,
    read_json,
    read_parquet,
    read_table,
    record_stage,
    write_json,
    write_table,
)
from pipelines.urllist import INTERNAL_HOST, REASONS, validate_url_list

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shards are named 00000.tar ...
ROBOTS_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's default opt-outs
CANONICAL = "canonical"  # the stats key that marks a shard rewritten by canonical_shard


def run_shard(config: Config) -> dict:
    cfg = config.shard
    out = config.shard_dir()
    fs, out_path = fsspec.core.url_to_fs(out)
    started = time.time()
    path, fmt = cfg.input.path, cfg.input.format
    if not path:
        raise ConfigError("shard.input.path is not set: nothing to shard (the demo world's config serves its own list)")
    with tempfile.TemporaryDirectory(prefix="softcurate-urls-") as workdir:
        counts = validate_url_list(path, workdir, fmt, cfg.input.url_col, cfg.input.caption_col, cfg.input.extra_cols,
                                   cfg.allow_private_urls)
        # the url list and the split decide which sample lands in which shard
        prepare_output(out, "shard", cfg.overwrite, {"digest": counts["digest"], "samples_per_shard": cfg.samples_per_shard},
                       state="_input.json")
        for name in ("_input.parquet", "_rejected.parquet"):
            with open(os.path.join(workdir, name), "rb") as src, atomic_open(join(out, name)) as dst:
                shutil.copyfileobj(src, dst)
    sizes = shard_sizes(counts["valid"], cfg.samples_per_shard)
    rejected = read_parquet(join(out, "_rejected.parquet"), ["status", "error_message"])
    save_config(config, join(out, "_config.yaml"))
    done = complete_shards(fs, out_path, sizes)
    forget_stats(fs, out_path, len(sizes), done)
    todo = len(sizes) - len(done)
    print(f"shard: {counts['rows']} rows from {path}: {counts['valid']} valid, {counts['rejected']} rejected; "
          f"{len(sizes)} shards, {len(done)} already complete, {todo} to do")
    refused = int((rejected["error_message"] == INTERNAL_HOST).sum())
    if refused:
        print(f"shard: refused {refused} urls whose host is loopback, private, link-local or localhost (an untrusted "
              "list must not reach internal services); set shard.allow_private_urls=true (--allow-private-urls) "
              "to download them")
    if todo:
        reader, downloader = img2dataset_parts(config, out, done)
        with dask_client(cfg.scheduler, cfg.processes) as client:
            print(f"shard: Dask dashboard {client.dashboard_link}")
            dask_distributor(cfg.processes, downloader, reader, max(1, todo), cfg.max_shard_retry)
        fs.invalidate_cache()  # the workers wrote the shards: drop our listings (s3fs caches them)
    if fs.exists(join(out_path, "_tmp")):
        fs.rm(join(out_path, "_tmp"), recursive=True)
    summary = summarize(fs, out_path, sizes, rejected, time.time() - started, input_rows=counts["rows"])
    write_json(join(out, "_summary.json"), summary)
    record_stage(config, "shard", {"input": {"path": path, "format": fmt, "rows": counts["rows"]},
                                   "output": out, "shards": summary["shards"], "counts": summary["counts"]})
    print_summary(summary)
    return summary


def shard_sizes(n_rows: int, per_shard: int) -> list[int]:
    return [min(per_shard, n_rows - i * per_shard) for i in range(math.ceil(n_rows / per_shard))]


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def complete_shards(fs, out_path: str, sizes: list[int]) -> set[int]:
    done = set()
    for shard_id, size in enumerate(sizes):
        base = join(out_path, shard_name(shard_id))
        stats = finished_stats(fs, base)
        if stats and stats["count"] == size:
            if not stats.get(CANONICAL):  # killed between img2dataset's end and the rewrite's: finish it, no download
                canonical_shard(fs, base)
            done.add(shard_id)
    return done


def finished_stats(fs, base: str) -> dict | None:
    """A shard's stats when img2dataset has finished it (tar, parquet, then stats, whose count is the parquet's rows)."""
    if not (fs.exists(base + ".tar") and fs.exists(base + ".parquet")):
        return None
    stats = read_stats(fs.unstrip_protocol(base + "_stats.json"))  # read_json takes a url (s3://...)
    try:
        with fs.open(base + ".parquet", "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except (OSError, ValueError):  # pyarrow's ArrowInvalid: a parquet cut short by a kill has no footer
        return None
    return stats if stats and stats.get("count") == rows else None


def canonical_shard(fs, base: str) -> None:
    """Rewrite a finished shard so the same samples give the same bytes: tar members sorted by key with
    fixed headers (mtime 0, a fixed owner), parquet rows sorted by key; each file replaced whole
    (pipelines.io's atomic write). Its stats are marked last: until then the shard is not
    complete, and a re-run rewrites it again (the rewrite of a canonical shard gives the same bytes)."""
    started = time.time()
    with fs.open(base + ".tar", "rb") as src, tarfile.open(fileobj=src, mode="r:") as tar, \
            atomic_open(fs.unstrip_protocol(base + ".tar")) as dst, \
            wds.TarWriter(dst, encoder=False, user="softcurate", group="softcurate", mtime=0) as sink:
        sample: dict = {}
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name.partition(".")[::2]):
            key, _, ext = member.name.partition(".")  # webdataset's key: the name up to its first dot
            if sample and sample["__key__"] != key:  # one sample in memory at a time; TarWriter orders its members
                sink.write(sample)
                sample = {}
            sample.update({"__key__": key, ext: tar.extractfile(member).read()})
        if sample:
            sink.write(sample)
    parquet = fs.unstrip_protocol(base + ".parquet")
    write_table(parquet, read_table(parquet).sort_by("key"))
    stats = fs.unstrip_protocol(base + "_stats.json")
    write_json(stats, {**read_json(stats), CANONICAL: True, "canonical_seconds": round(time.time() - started, 3)})


class CanonicalShards:
    """The download task: img2dataset's downloader, then canonical_shard on the shard it finished."""

    def __init__(self, downloader, out: str):
        self.downloader, self.out = downloader, out

    def __call__(self, row):
        fs, out_path = fsspec.core.url_to_fs(self.out)
        base = join(out_path, shard_name(row[0]))
        # Finished already: this task ran before and its worker died during the rewrite. img2dataset has
        # deleted its input shard by then, so only the rewrite is left to do.
        if finished_stats(fs, base) is None:
            status, row = self.downloader(row)
            if not status:
                return status, row
        canonical_shard(fs, base)
        return True, row


def read_stats(path: str) -> dict | None:
    """A shard's img2dataset stats; None when missing or cut short (img2dataset writes it in place, not renamed)."""
    try:
        return read_json(path)
    except ValueError:
        return None


def forget_stats(fs, out_path: str, n_shards: int, done: set[int]) -> None:
    """Stats of a shard about to be redone: gone first, so a kill during the redo never leaves old stats beside a new half tar."""
    for shard_id in set(range(n_shards)) - done:
        stats = join(out_path, shard_name(shard_id) + "_stats.json")
        if fs.exists(stats):
            fs.rm(stats)


def img2dataset_parts(config: Config, out: str, done: set[int]) -> tuple[Reader, CanonicalShards]:
    """img2dataset's own Reader and Downloader, configured as its `download()` would."""
    cfg = config.shard
    reader = Reader(join(out, "_input.parquet"), "parquet", "url", "caption", None, None,
                    ["row", *cfg.input.extra_cols], cfg.samples_per_shard, done, join(out, "_tmp"))
    fs, tmp = fsspec.core.url_to_fs(join(out, "_tmp"))
    fs.makedirs(tmp, exist_ok=True)
    resizer = BoundedResizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                             encode_quality=cfg.encode_quality, encode_format=cfg.encode_format,
                             min_image_size=cfg.min_image_size, max_image_area=cfg.max_image_area or float("inf"),
                             max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
                             max_decode_pixels=cfg.max_decode_pixels)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.threads, save_caption=True,
        extract_exif=cfg.extract_exif, output_folder=out, column_list=reader.column_list, timeout=cfg.timeout,
        number_sample_per_shard=cfg.samples_per_shard, oom_shard_count=SHARD_DIGITS, compute_hash=cfg.compute_hash,
        verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=None,
        disallowed_header_directives=ROBOTS_DIRECTIVES)
    # Each connection (and redirect) only to public addresses, unless private urls are allowed.
    return reader, CanonicalShards(PublicDownloader(downloader, cfg.allow_private_urls), out)


def failure_reason(error_message: str | None) -> str:
    """Group img2dataset's free-text errors into stable reasons (no addresses, no per-url details)."""
    if error_message is None:
        return "unknown"
    if error_message in REASONS:  # validation's own reasons are stable already (and "UTF-8" is no number)
        return error_message
    msg = error_message.lower()
    if "infinite loop" in msg:  # urllib's HTTPError for a redirect loop (or more than 10 redirects)
        return "redirect loop"
    if m := re.search(r"http error (\d{3})", msg):
        return f"http {m.group(1)}"
    for needle, reason in (("timed out", "timeout"), ("incompleteread", "truncated download"),
                           ("image decoding error", "not an image"), ("connection refused", "connection refused"),
                           ("name or service not known", "dns failure"), ("x-robots-tag", "opted out (X-Robots-Tag)"),
                           (REFUSED, "refused: internal address"), ("empty response", "empty response"),
                           ("truncated image", "truncated image"), ("too large to decode", "image too large to decode")):
        if needle in msg:
            return reason
    return re.sub(r"0x[0-9a-f]+|\d+", "N", error_message)[:80]


def summarize(fs, out_path: str, sizes: list[int], rejected: pl.DataFrame, seconds: float, input_rows: int) -> dict:
    names = [shard_name(i) for i in range(len(sizes))]
    stats = [read_stats(fs.unstrip_protocol(join(out_path, n + "_stats.json"))) for n in names]
    stats = [s if s and s.get(CANONICAL) else None for s in stats]  # a shard not rewritten yet is not complete
    # only complete shards: an incomplete one's parquet may be cut short (it is listed as incomplete instead)
    tables = [read_parquet(fs.unstrip_protocol(join(out_path, n + ".parquet")), ["status", "error_message"])
              for n, s in zip(names, stats) if s]
    downloaded = pl.concat(tables) if tables else pl.DataFrame(schema={"status": pl.String, "error_message": pl.String})
    failures = pl.concat([downloaded.filter(pl.col("status") != "success"), rejected.select("status", "error_message")])
    reasons = failures.with_columns(
        reason=pl.col("error_message").map_elements(failure_reason, return_dtype=pl.String)
    ).group_by("status", "reason").len().sort("len", "status", "reason", descending=[True, False, False])
    successes = int((downloaded["status"] == "success").sum())
    complete = [n for n, s in zip(names, stats) if s]
    shard_seconds = sum(s["duration"] for s in stats if s)
    return {
        "shards": [n + ".tar" for n in complete],
        "incomplete_shards": [n + ".tar" for n, s in zip(names, stats) if not s],
        "counts": {"input_rows": input_rows, "rejected": rejected.height, "attempted": downloaded.height,
                   "successes": successes, "failures": failures.height},
        "failures_by_reason": [{"status": s, "reason": r, "count": c} for s, r, c in reasons.iter_rows()],
        "seconds": round(seconds, 2),
        "images_per_second": round(successes / seconds, 1) if seconds else None,
        "shard_task_seconds": round(shard_seconds, 2),
        "canonical_seconds": round(sum(s.get("canonical_seconds", 0.0) for s in stats if s), 2),
    }


def print_summary(summary: dict) -> None:
    c = summary["counts"]
    missing = c["input_rows"] - c["successes"] - c["failures"]
    state = "reconciled" if missing == 0 else f"{missing} ROWS UNACCOUNTED"
    print(f"\nshard summary: {c['input_rows']} input rows = {c['successes']} samples + {c['failures']} failures"
          f" ({state})")
    for row in summary["failures_by_reason"]:
        print(f"  {row['count']:>8}  {row['status']:<20} {row['reason']}")
    if summary["incomplete_shards"]:
        print(f"  incomplete shards (re-run to retry): {', '.join(summary['incomplete_shards'])}")
    print(f"  {len(summary['shards'])} shards, {summary['seconds']} s, {summary['images_per_second']} images/s")
