"""The demo world: a procedurally generated image-caption dataset whose noise is known.

A generator (`world.kind`, pipelines/worlds/) draws the scenes, renders them and captions them with
several templates and synonyms, some only partly. The train split carries injected noise (swapped
captions, one wrong attribute, web boilerplate, real web alt-text of unrelated images, near-duplicate
images with a wrong caption) and
`truth.parquet` records which rows are noisy and how, so noise detection and soft targets can be
scored against ground truth. Val and test are clean WebDataset tars.

Every item comes from its own RNG, `default_rng([seed, split, index, stream])`, so any item can be
regenerated alone and the same seed and config give byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.resources
import io
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.config import Config, ConfigError, WorldConfig, ZeroShotTask, join
from pipelines.io import atomic_open, atomic_write
from pipelines.worlds import generator

TRAIN, VAL, TEST, FAIL = 0, 1, 2, 3  # split ids in the RNG keys
BOILERPLATE = ("click to enlarge", "image may contain: outdoor", "image may contain: one or more people",
               "stock photo", "thumbnail", "no description available", "untitled", "view full size",
               "royalty free stock image", "free download", "placeholder image", "add to cart",
               "IMG_{}.JPG", "DSC_{}.jpg", "photo {} of {}")
# near_duplicate last: pick_noise takes the clean duplicates' slots right after its noisy ones
NOISE_TYPES = ("swapped_caption", "wrong_attribute", "boilerplate", "unrelated_caption", "near_duplicate")
CC3M_CAPTIONS = "cc3m_captions.txt.gz"  # beside this file: captions only, distinct, from tests/data/cc3m
SERVING_KEYS = ("dir", "host", "port", "timeout_delay")  # do not change the content


# ---------------------------------------------------------------- images
def near_duplicate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A one-pixel shift, a brightness change and a lossy re-encode of the same picture."""
    size = image.size[0]
    dx, dy = rng.integers(-1, 2, 2)
    pixels = np.pad(np.asarray(image, np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    pixels = pixels[1 + dy:1 + dy + size, 1 + dx:1 + dx + size] * rng.uniform(0.96, 1.04)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(60, 85)))
    return Image.open(buffer).convert("RGB")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------- captions
def boilerplate(rng: np.random.Generator) -> str:
    template = BOILERPLATE[rng.integers(len(BOILERPLATE))]
    if template.startswith("photo"):
        total = int(rng.integers(2, 30))
        return template.format(int(rng.integers(1, total + 1)), total)
    return template.format(f"{int(rng.integers(10000)):04d}")


def boilerplate_regex() -> re.Pattern:
    return re.compile("|".join(re.escape(t).replace(r"\{\}", r"\d+") for t in BOILERPLATE))


# ---------------------------------------------------------------- noise
def pick_noise(n: int, cfg: WorldConfig, seed: int) -> tuple[list[str], list[int], dict]:
    """Disjoint noisy sets, the clean near-duplicates and the originals they copy."""
    counts = {t: round(getattr(cfg.noise, t) * n) for t in NOISE_TYPES}
    order = np.random.default_rng([seed, 100]).permutation(n)
    pool_size = n - sum(counts.values()) - counts["near_duplicate"]
    if pool_size < 0 or (counts["near_duplicate"] and pool_size < 1):
        raise ValueError(f"world.noise fractions {counts} leave no clean train items out of n_train={n}")
    if counts["unrelated_caption"] and counts["unrelated_caption"] > len(cc3m_captions()):
        raise ValueError(f"world.noise.unrelated_caption asks for {counts['unrelated_caption']} captions; "
                         f"the shipped CC3M list has {len(cc3m_captions())}")
    kinds, dup_of, start = ["clean"] * n, [-1] * n, 0
    for kind in NOISE_TYPES:
        for i in order[start:start + counts[kind]]:
            kinds[i] = kind
        start += counts[kind]
    dups = list(order[start - counts["near_duplicate"]:start + counts["near_duplicate"]])
    pool = order[start + counts["near_duplicate"]:]
    if dups:  # distinct originals, all clean, when there are enough
        originals = np.random.default_rng([seed, 101]).choice(pool, len(dups), replace=len(pool) < len(dups))
        for i, j in zip(dups, originals):
            dup_of[i] = int(j)
    return kinds, dup_of, counts


@functools.cache
def cc3m_captions() -> tuple[str, ...]:
    """The distinct captions of CC3M's validation list (Conceptual Captions, Google LLC), in file order."""
    data = importlib.resources.files("pipelines").joinpath(CC3M_CAPTIONS).read_bytes()
    return tuple(gzip.decompress(data).decode("utf-8").splitlines())


def unrelated_captions(seed: int, targets: list[int], avoid: set[str]) -> dict[int, str]:
    """target -> a real web caption written for some other image, each used once and unlike any other caption
    of the world."""
    if not targets:
        return {}
    pool = cc3m_captions()
    order = (pool[k] for k in np.random.default_rng([seed, 103]).permutation(len(pool)))
    chosen = list(itertools.islice((c for c in order if c not in avoid), len(targets)))
    if len(chosen) < len(targets):
        raise ValueError(f"world.noise.unrelated_caption: {len(targets)} captions asked, {len(chosen)} left in the CC3M list")
    return dict(zip(targets, chosen))


def derange(gen, targets: list[int], specs: list[dict], objects: list[list[dict]], rng) -> dict[int, int]:
    """target -> donor: a permutation of the targets' own captions in which no caption fits its new image."""
    order = [int(t) for t in rng.permutation(targets)]
    if len(order) == 1:  # nothing to permute with: borrow from a neighbour
        order.append((order[0] + 1) % len(specs))
    donor = dict(zip(order, order[1:] + order[:1]))  # one cycle: nobody keeps their own
    donor = {t: donor[t] for t in targets}

    def bad(t: int) -> bool:
        return donor[t] == t or gen.describes(specs[donor[t]]["mentions"], objects[t])

    for t in list(donor):
        for _ in range(200):
            if not bad(t):
                break
            u = int(rng.choice(targets))
            donor[t], donor[u] = donor[u], donor[t]
            if bad(u):  # keep a swap only if it does not break the other target
                donor[t], donor[u] = donor[u], donor[t]
    return donor


def fresh_caption(gen, seed: int, index: int, objects: list[dict], avoid: str, partial_rate: float) -> tuple[str, dict]:
    """A correct caption worded differently from `avoid` (for a near-duplicate of another item)."""
    for attempt in range(100):
        text, spec = gen.make_caption(objects, np.random.default_rng([seed, TRAIN, index, 3, attempt]), partial_rate)
        if text != avoid:
            break
    return text, spec


def other_scene_caption(gen, seed: int, index: int, objects, specs, captions) -> str:
    """The clean caption of some other item that does not fit this image."""
    rng = np.random.default_rng([seed, TRAIN, index, 6])
    for _ in range(1000):
        k = int(rng.integers(len(specs)))
        if k != index and not gen.describes(specs[k]["mentions"], objects):
            break
    return captions[k]


# ---------------------------------------------------------------- what the world supplies to the stages
def with_world_defaults(config: Config) -> Config:
    """The demo world supplies what the config leaves unset: the validation split, the evaluation data, its
    zero-shot tasks and DN's unlabeled samples, and the truth table; the stages never know it exists."""
    if config.world is None:
        return config
    world = config.world_dir()
    train, evaluate, update = {}, {}, {}
    if config.world.n_val and not config.train.val_shards:
        train["val_shards"] = join(world, "val.tar")
    if config.world.n_test and not (config.evaluate.data or config.evaluate.folder):
        evaluate["data"] = join(world, "test.tar")
        if config.world.n_val and not config.evaluate.dn_data:
            evaluate["dn_data"] = join(world, "val.tar")
        if not (config.evaluate.tasks or config.evaluate.classnames):
            gen = generator(config.world.kind)
            evaluate["tasks"] = {task: ZeroShotTask(label_field=f"zero_shot.{task}", classnames=list(gen.VOCAB[task]),
                                                    templates=list(templates)) for task, templates in gen.ZERO_SHOT.items()}
    if config.truth is None:
        update["truth"] = join(world, "truth.parquet")
    if train:
        update["train"] = config.train.model_copy(update=train)
    if evaluate:
        update["evaluate"] = config.evaluate.model_copy(update=evaluate)
    return config.model_copy(update=update)


@contextlib.contextmanager
def serving(config: Config) -> Iterator[Config]:
    """For a demo config without shard.input.path: the world built and served on loopback while the block
    runs, and the config pointed at its url list (CC12M format). Any other config passes through."""
    if config.world is None or config.shard.input.path:
        yield config
        return
    if not config.shard.allow_private_urls:
        raise ConfigError("the demo world is served on loopback, whose urls the shard stage refuses by default; "
                          "set shard.allow_private_urls: true (--allow-private-urls) to shard it")
    from pipelines.world_server import serve_world

    world_dir = config.world_dir()
    build_world(config.world, world_dir, config.seed)
    with serve_world(world_dir, config.world.host, config.world.port, config.world.timeout_delay) as base_url:
        tsv, _ = write_url_list(world_dir, base_url)
        print(f"shard: serving the demo world at {base_url}")
        source = config.shard.input.model_copy(update={"path": tsv, "format": "cc12m"})
        yield config.model_copy(update={"shard": config.shard.model_copy(update={"input": source})})


def run_world(config: Config) -> dict:
    if config.world is None:
        raise ConfigError("the config lists the world stage but has no world section")
    summary = build_world(config.world, config.world_dir(), config.seed)
    print(f"world: {summary['n_train']} train pairs (noise {summary['noise_counts']}), "
          f"{summary['n_val']} val, {summary['n_test']} test in {summary['dir']}")
    return summary


# ---------------------------------------------------------------- building the world
WORLD_FORMAT = 2  # what the files hold; a world on disk of another format is built again
def build_world(cfg: WorldConfig, out_dir: str, seed: int) -> dict:
    """Write images/, truth.parquet, val.tar, test.tar and (last) world.json; reuse a finished identical world."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0 for the world's RNGs, got {seed}")
    meta_path = os.path.join(out_dir, "world.json")
    previous = read_meta(out_dir, missing_ok=True)
    if previous and same_world(previous, cfg, seed):
        return summary(previous, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_path):  # the old world stops being complete as soon as we touch it
        os.remove(meta_path)
    gen = generator(cfg.kind)
    noise_counts, partial = build_train(gen, cfg, out_dir, seed)
    write_split(gen, os.path.join(out_dir, "val.tar"), seed, VAL, cfg.n_val, cfg)
    write_split(gen, os.path.join(out_dir, "test.tar"), seed, TEST, cfg.n_test, cfg)
    meta = {"format": WORLD_FORMAT, "config": cfg.model_dump(mode="json"), "seed": seed,
            "n_train": cfg.n_train, "n_val": cfg.n_val, "n_test": cfg.n_test,
            "noise_counts": noise_counts, "clean_near_duplicates": noise_counts["near_duplicate"],
            "partial_train_captions": partial, **gen.META,
            "templates": {**gen.META["templates"], "boilerplate": list(BOILERPLATE)}}
    atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")
    return summary(meta, out_dir)


def same_world(meta: dict, cfg: WorldConfig, seed: int) -> bool:
    """Same content parameters and seed (where and how the world is served does not matter)."""
    content = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SERVING_KEYS}
    return meta.get("format") == WORLD_FORMAT and meta.get("seed") == seed and {k: v for k, v in meta.get("config", {}).items()
                                         if k not in SERVING_KEYS} == content


def summary(meta: dict, out_dir: str) -> dict:
    return {"n_train": meta["n_train"], "n_val": meta["n_val"], "n_test": meta["n_test"],
            "noise_counts": meta["noise_counts"], "dir": out_dir}


def build_train(gen, cfg: WorldConfig, out_dir: str, seed: int) -> tuple[dict, int]:
    """images/ (written as we go), then the published captions with their noise, then truth.parquet."""
    kinds, dup_of, counts = pick_noise(cfg.n_train, cfg, seed)
    staging = os.path.join(out_dir, "images.partial")
    objects, clean, specs = write_train_images(gen, cfg, seed, dup_of, staging)
    captions = add_caption_noise(gen, seed, kinds, objects, clean, specs)
    table = truth_table(gen, captions, clean, kinds, dup_of, objects, specs)
    images = os.path.join(out_dir, "images")
    shutil.rmtree(images, ignore_errors=True)
    os.replace(staging, images)
    pq.write_table(table, os.path.join(out_dir, "truth.parquet.partial"))
    os.replace(os.path.join(out_dir, "truth.parquet.partial"), os.path.join(out_dir, "truth.parquet"))
    return {"clean": kinds.count("clean")} | counts, sum(s["partial"] for s in specs)


def write_train_images(gen, cfg: WorldConfig, seed: int, dup_of: list[int], staging: str) -> tuple[list, list, list]:
    """Every train image into `staging`; returns each item's objects and correct caption (with its spec)."""
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    objects, captions, specs = [], [], []
    for i, j in enumerate(dup_of):
        scene = gen.make_scene(seed, TRAIN, j if j >= 0 else i, cfg)
        image = gen.render(scene, cfg.image_size)
        if j >= 0:
            image = near_duplicate(image, np.random.default_rng([seed, TRAIN, i, 2]))
        with open(os.path.join(staging, f"{i:07d}.jpg"), "wb") as f:
            f.write(jpeg(image))
        text, spec = gen.make_caption(scene["objects"], np.random.default_rng([seed, TRAIN, i, 1]), cfg.partial_caption)
        objects.append(scene["objects"])
        captions.append(text)
        specs.append(spec)
    for i, j in enumerate(dup_of):  # a near-duplicate's correct caption is worded unlike its original's
        if j >= 0 and captions[i] == captions[j]:
            captions[i], specs[i] = fresh_caption(gen, seed, i, objects[i], captions[j], cfg.partial_caption)
    return objects, captions, specs


def add_caption_noise(gen, seed: int, kinds: list[str], objects: list, clean: list[str], specs: list[dict]) -> list[str]:
    """The published captions. A wrong_attribute item whose caption cannot be made wrong gets a full one."""
    captions = list(clean)
    swapped = [i for i, kind in enumerate(kinds) if kind == "swapped_caption"]
    for target, donor in derange(gen, swapped, specs, objects, np.random.default_rng([seed, 102])).items():
        captions[target] = clean[donor]
    for i, kind in enumerate(kinds):
        if kind == "wrong_attribute":
            rng = np.random.default_rng([seed, TRAIN, i, 5])
            text = gen.wrong_attribute(specs[i], objects[i], rng)
            if text is None:  # e.g. "a small thing" beside two small things: describe everything instead
                specs[i] = {**specs[i], "mentions": [dict(o) for o in objects[i]], "partial": False}
                clean[i] = gen.render_caption(specs[i])
                text = gen.wrong_attribute(specs[i], objects[i], rng)
            captions[i] = text
        elif kind == "boilerplate":
            captions[i] = boilerplate(np.random.default_rng([seed, TRAIN, i, 4]))
        elif kind == "near_duplicate":
            captions[i] = other_scene_caption(gen, seed, i, objects[i], specs, clean)
    unrelated = [i for i, kind in enumerate(kinds) if kind == "unrelated_caption"]
    for i, text in unrelated_captions(seed, unrelated, set(captions) | set(clean)).items():
        captions[i] = text
    assert all(c and "\t" not in c and "\n" not in c for c in captions)
    return captions


def truth_table(gen, captions, clean, kinds, dup_of, objects, specs) -> pa.Table:
    first = [o[0] for o in objects]
    return pa.table({
        "row": pa.array(range(len(captions)), pa.int64()),
        "image": [f"{i:07d}.jpg" for i in range(len(captions))],
        "caption": captions, "clean_caption": clean,
        "noisy": pa.array([k != "clean" for k in kinds], pa.bool_()),
        "noise_type": kinds,
        "dup_of": pa.array(dup_of, pa.int64()),
        "n_objects": pa.array([len(o) for o in objects], pa.int8()),
        **{a: [o[a] for o in first] for a in gen.VOCAB},
        "objects": [json.dumps(o) for o in objects],
        "partial": pa.array([s["partial"] for s in specs], pa.bool_()),  # of the clean caption
    })


def write_split(gen, path: str, seed: int, split: int, n: int, cfg: WorldConfig) -> None:
    """A clean split as one WebDataset tar: jpg, txt and json labels per sample."""
    import webdataset as wds  # here, not at the top: it imports torch (seconds, ~500 MB)

    with atomic_open(path) as f, wds.TarWriter(f, mtime=0) as sink:  # fixed mtime: same bytes every run
        for i in range(n):
            scene = gen.make_scene(seed, split, i, cfg)
            objects = scene["objects"]
            text, spec = gen.make_caption(objects, np.random.default_rng([seed, split, i, 1]), cfg.partial_caption)
            labels = {**objects[0], "objects": objects, "partial": spec["partial"]}
            if len(objects) == 1:  # zero-shot labels only where they are unambiguous
                labels["zero_shot"] = {task: objects[0][task] for task in gen.ZERO_SHOT}
            sink.write({"__key__": f"{i:07d}", "jpg": jpeg(gen.render(scene, cfg.image_size)), "txt": text,
                        "json": labels})


def read_meta(world_dir: str, missing_ok: bool = False) -> dict | None:
    try:
        with open(os.path.join(world_dir, "world.json"), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        if missing_ok:
            return None
        raise FileNotFoundError(f"{world_dir}: no complete world (world.json); run build_world first") from None


# ---------------------------------------------------------------- the url list
FAILING_KINDS = {"http_404": "404", "http_500": "500", "timeout": "timeout", "truncated": "truncated",
                 "html": "html"}


def world_truth(config, columns: tuple[str, ...]) -> pl.DataFrame | None:
    """Columns of the world's truth.parquet (its objects, clean captions and noise, by row) when the config has
    a built world, else None; the stages read only its labels, through `truth` (pipelines.io.read_truth)."""
    path = os.path.join(config.world_dir(), "truth.parquet") if config.world is not None else None
    if not path or not os.path.exists(path):
        return None
    return pl.read_parquet(path, columns=list(columns))


def failing_rows(world_dir: str) -> int:
    """How many rows of the url list point at failing urls."""
    return sum(read_meta(world_dir)["config"]["failing_urls"].values())


def write_url_list(world_dir: str, base_url: str) -> tuple[str, str]:
    """urls.tsv (CC12M: url<TAB>caption) and urls.parquet: every train item, then the failing urls."""
    meta = read_meta(world_dir)
    cfg = WorldConfig.model_validate(meta["config"])
    gen = generator(cfg.kind)
    base = base_url.rstrip("/")
    truth = pq.read_table(os.path.join(world_dir, "truth.parquet"), columns=["image", "caption"]).to_pydict()
    urls = [f"{base}/images/{name}" for name in truth["image"]]
    captions = truth["caption"]
    for key, kind in FAILING_KINDS.items():
        for k in range(getattr(cfg.failing_urls, key)):
            row = len(urls)  # a plausible caption, from a scene of its own
            objects = gen.make_scene(meta["seed"], FAIL, row, cfg)["objects"]
            rng = np.random.default_rng([meta["seed"], FAIL, row, 1])
            captions.append(gen.make_caption(objects, rng, cfg.partial_caption)[0])
            urls.append(f"{base}/fail/{kind}/{k}.jpg")
    tsv, parquet = os.path.join(world_dir, "urls.tsv"), os.path.join(world_dir, "urls.parquet")
    atomic_write(tsv, "".join(f"{u}\t{c}\n" for u, c in zip(urls, captions)))
    table = pa.table({"url": urls, "caption": captions, "row": pa.array(range(len(urls)), pa.int64())})
    with atomic_open(parquet) as f:
        pq.write_table(table, f)
    return tsv, parquet
