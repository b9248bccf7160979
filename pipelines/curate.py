"""The curate stage: a selection policy over the scores -> a keep-list, and (--export) curated shards.

    scores/NNNNN.parquet ─▶ curate.policies (global facts, then a shard at a time) ─▶ curated/keep.parquet (key, keep, weight, reason)
    --export: shards/NNNNN.tar ─▶ curated/NNNNN.tar (kept samples + their score fields, evenly sized)
                                └▶ curated/unpaired_images/, curated/unpaired_texts/ (MMCL's unpaired pools;
                                   a mismatched image keeps its caption as txt, for aligned batching)

The keep-list is what the train stage reads (`train.keep_list`) without rewriting any image; the
exported shards are for other trainers (`python -m open_clip_train.main --train-data ...`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from typing import Iterator

import fsspec
import numpy as np
import polars as pl
import webdataset as wds

from curate.policies import DECISION, decisions
from pipelines.config import Config, join
from pipelines.io import (
    TMP,
    atomic_open,
    prepare_output,
    read_parquet,
    read_shard,
    record_stage,
    score_facts,
    score_files,
    sink_parquet,
    write_json,
)

MISMATCH = ("clean_prob", "cosine", "dn_score")  # reasons that say the caption does not fit the image
EXPORTED = ("key", "cosine", "dn_score", "loss", "clean_prob")  # the score fields an exported sample carries
CAPTION_ERRORS = ("empty caption", "caption is not UTF-8", "no caption in the sample")


def run_curate(config: Config, export: bool | None = None) -> dict:
    cfg = config.curate
    out = config.curate_dir()
    paths, names, missing = score_files(config)
    if missing:
        print(f"curate: WARNING: no scores for {len(missing)} shard(s) ({', '.join(missing)}): their samples are left out")
    steps = [step.model_dump(exclude_defaults=True) for step in cfg.policy]
    # the cuts and cluster keepers over every pair first, then the decisions a shard at a time
    parts, facts = score_facts(config, list(paths.values()), steps)
    prepare_output(out, "curate")
    counts = {"pairs": 0, "kept": 0, "dropped_by": Counter()}

    def counted() -> Iterator[pl.DataFrame]:
        for _, part in decisions(parts, steps, facts):
            counts["pairs"] += len(part)
            counts["kept"] += int(part["keep"].sum())
            counts["dropped_by"].update(dropped_by(part))
            yield part

    sink_parquet(join(out, "keep.parquet"), DECISION, counted())
    pairs, kept = counts["pairs"], counts["kept"]
    summary = {"policy": steps, "pairs": pairs, "kept": kept, "dropped": pairs - kept,
               "kept_fraction": kept / pairs if pairs else 0.0, "dropped_by": dict(sorted(counts["dropped_by"].items())),
               "missing_scores": missing, "keep_list": join(out, "keep.parquet")}
    if kept == 0:
        print(f"curate: WARNING: the policy {steps} keeps none of the {pairs} pairs; nothing exported, "
              "and training on this keep-list is refused. Loosen the policy (e.g. a lower clean_prob min).")
    elif export if export is not None else cfg.export:
        scored = zip(paths, decisions(parts, steps, facts, EXPORTED))  # computed again, a shard at a time
        summary["export"] = export_shards(config, scored, kept, names)
    write_json(join(out, "_summary.json"), summary)
    record_stage(config, "curate", {"output": out, "kept": kept, "pairs": pairs})
    print_summary(summary)
    return summary


def dropped_by(decisions: pl.DataFrame) -> dict[str, int]:
    """Dropped pairs by the kind of step that dropped them (the reason without its numbers)."""
    kinds = decisions.filter(~pl.col("keep"))["reason"].str.extract(r"^(not scored|near-duplicate|[a-z_]+)", 1)
    return dict(sorted(kinds.value_counts().iter_rows()))


def export_shards(config: Config, scored: Iterator[tuple[str, tuple[pl.DataFrame, pl.DataFrame]]], kept: int,
                  names: list[str]) -> dict:
    """Kept samples into evenly sized tars (with their scores in the json), and the unpaired pools.

    `scored` gives each scored shard's name, scores (the EXPORTED fields) and decisions, in shard order."""
    cfg = config.curate
    out = config.curate_dir()
    fs, out_path = fsspec.core.url_to_fs(out)
    for old in fs.glob(out_path + "/*.tar") + fs.glob(out_path + "/*.tar" + TMP) + fs.glob(out_path + "/*_stats.json"):
        # a previous export, or what a killed one left
        fs.rm(old)
    for pool in ("unpaired_images", "unpaired_texts"):
        if fs.exists(f"{out_path}/{pool}"):
            fs.rm(f"{out_path}/{pool}", recursive=True)
    n_shards = math.ceil(kept / cfg.samples_per_shard)
    sizes = [kept // n_shards + (i < kept % n_shards) for i in range(n_shards)]
    curated = Writer(out, sizes)
    pools = {"images": Writer(join(out, "unpaired_images"), None, cfg.samples_per_shard),
             "texts": Writer(join(out, "unpaired_texts"), None, cfg.samples_per_shard)}
    scored = iter(scored)
    pending = next(scored, None)
    for name in names:
        decision, by_key = {}, {}  # a shard without scores
        if pending is not None and pending[0] == name:
            # one shard's decisions and fields at a time as Python objects
            scores, part = pending[1]
            decision = dict(zip(part["key"].to_list(), part["reason"].to_list()))
            fields = scores.select(*EXPORTED).with_columns(weight=part["weight"])
            by_key = {row["key"]: row for row in fields.iter_rows(named=True)}
            pending = next(scored, None)
        for sample in read_shard(join(config.shard_dir(), name + ".tar")):
            key = sample["__key__"]
            if key not in decision:
                continue  # a shard without scores
            reason = decision[key]
            if reason is None:
                meta = json.loads(sample.get("json", b"{}"))
                meta["softcurate"] = {k: v for k, v in by_key[key].items() if k != "key"}
                curated.write({"__key__": key, "jpg": sample["jpg"], "txt": sample["txt"], "json": json.dumps(meta)})
            elif (mismatch := reason.startswith(MISMATCH)) or reason.startswith("not scored"):
                error, meta = reason.removeprefix("not scored: "), sample.get("json", b"{}")
                if "jpg" in sample and (mismatch or error in CAPTION_ERRORS):
                    caption = {"txt": sample["txt"]} if mismatch and "txt" in sample else {}  # for MMCL's aligned batching
                    pools["images"].write({"__key__": key, "jpg": sample["jpg"], "json": meta, **caption})
                if "txt" in sample and (mismatch or error not in CAPTION_ERRORS):
                    pools["texts"].write({"__key__": key, "txt": sample["txt"], "json": meta})
        for key, caption in failed_downloads(config, name):  # captions whose image never arrived
            pools["texts"].write({"__key__": key, "txt": caption.encode("utf-8"), "json": json.dumps({"key": key})})
    return {"shards": curated.close(), "unpaired_images": pools["images"].close(), "unpaired_texts": pools["texts"].close()}


def failed_downloads(config: Config, name: str) -> list[tuple[str, str]]:
    rows = read_parquet(join(config.shard_dir(), name + ".parquet"), ["key", "status", "caption"])
    rows = rows.filter((pl.col("status") != "success") & pl.col("caption").is_not_null() & (pl.col("caption").str.strip_chars() != ""))
    return list(rows.select("key", "caption").iter_rows())


class Writer:
    """Tars named 00000.tar ... with img2dataset-style _stats.json; fixed sizes, or rolled every `per_shard`."""

    def __init__(self, out: str, sizes: list[int] | None, per_shard: int | None = None):
        self.out, self.sizes, self.per_shard = out, sizes, per_shard
        self.shard, self.count, self.total, self.tar, self.pending, self.written = -1, 0, 0, None, None, []

    def capacity(self) -> float:
        if self.sizes is not None:
            return self.sizes[self.shard] if self.shard < len(self.sizes) else np.inf
        return self.per_shard

    def write(self, sample: dict) -> None:
        if self.tar is None or self.count >= self.capacity():
            self.roll()
        self.tar.write(sample)  # mtime 0, fixed owner: the same samples give the same bytes
        self.count += 1
        self.total += 1

    def roll(self) -> None:
        self.finish()
        self.shard += 1
        self.count = 0
        self.pending = contextlib.ExitStack()  # the tar's atomic_open, held open across write() calls
        stream = self.pending.enter_context(atomic_open(f"{self.out}/{self.shard:05d}.tar"))
        self.tar = wds.TarWriter(stream, user="softcurate", group="softcurate", mtime=0)

    def finish(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.pending.close()  # the tar under its name
        write_json(f"{self.out}/{self.shard:05d}_stats.json", {"count": self.count, "successes": self.count})
        self.written.append(f"{self.out}/{self.shard:05d}.tar")
        self.tar = None

    def close(self) -> dict:
        self.finish()
        return {"shards": self.written, "samples": self.total,
                "urls": f"{self.out}/{{00000..{len(self.written) - 1:05d}}}.tar" if self.written else None}


def print_summary(summary: dict) -> None:
    print(f"\ncurate summary: {summary['pairs']} pairs -> {summary['kept']} kept ({summary['kept_fraction']:.1%}), "
          f"{summary['dropped']} dropped; keep-list {summary['keep_list']}")
    for kind, count in summary["dropped_by"].items():
        print(f"  {count:>8}  dropped by {kind}")
    if "export" in summary:
        e = summary["export"]
        print(f"  exported {e['shards']['samples']} samples in {len(e['shards']['shards'])} shards: {e['shards']['urls']}")
        print(f"  unpaired pools: {e['unpaired_images']['samples']} images ({e['unpaired_images']['urls']}), "
              f"{e['unpaired_texts']['samples']} texts ({e['unpaired_texts']['urls']})")
