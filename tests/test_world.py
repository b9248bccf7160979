"""The demo world: determinism, exact injected noise, clean splits, the url list and the loopback server."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import http.client
import importlib.util
import json
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from conftest import ROOT
from PIL import Image

from pipelines import world
from pipelines.config import ConfigError, WorldConfig, load_config
from pipelines.world import build_world, failing_rows, write_url_list
from pipelines.world_server import serve_world
from pipelines.worlds import patterns, shapes

SEED = 7
CFG = WorldConfig(n_train=300, n_val=20, n_test=20, noise={"unrelated_caption": 0.05})
ATTRIBUTE_WORDS = {w for words in shapes.WORDS.values() for options in words.values() for w in options} \
    | set(shapes.SHAPE_ADJECTIVES.values())


def built(tmp_path_factory, cfg: WorldConfig, name: str) -> str:
    out = str(tmp_path_factory.mktemp(name) / "w")
    build_world(cfg, out, SEED)
    return out


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> str:
    return built(tmp_path_factory, CFG, "world")


@pytest.fixture(scope="module")
def truth(world_dir) -> pl.DataFrame:
    return pl.read_parquet(os.path.join(world_dir, "truth.parquet"))


def load(world_dir: str, index: int) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(world_dir, "images", f"{index:07d}.jpg")), np.float32)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokens(caption: str) -> list[str]:
    return [t.strip(",;:.") for t in caption.split()]


def read_split(path: str) -> list[dict]:
    with warnings.catch_warnings():  # webdataset 0.2.86 leaves the tar open; collect it here, quietly
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(wds.WebDataset(path, shardshuffle=False).decode("pil"))
        gc.collect()
    return samples


# ---------------------------------------------------------------- files and determinism
def test_layout_and_truth_schema(world_dir, truth):
    assert sorted(os.listdir(world_dir)) == ["images", "test.tar", "truth.parquet", "val.tar", "world.json"]
    assert len(os.listdir(os.path.join(world_dir, "images"))) == CFG.n_train
    assert truth.height == CFG.n_train
    assert truth["row"].to_list() == list(range(CFG.n_train))
    assert truth["image"].to_list() == [f"{i:07d}.jpg" for i in range(CFG.n_train)]
    types = dict(truth.schema)
    assert types["row"] == pl.Int64 and types["dup_of"] == pl.Int64 and types["n_objects"] == pl.Int8
    assert types["noisy"] == pl.Boolean
    for column in ("caption", "clean_caption", "noise_type", "shape", "colour", "size", "position", "objects"):
        assert types[column] == pl.String
    for row in truth.iter_rows(named=True):
        objects = json.loads(row["objects"])
        assert len(objects) == row["n_objects"] and 1 <= len(objects) <= 3
        assert {a: objects[0][a] for a in shapes.ATTRS} == {a: row[a] for a in shapes.ATTRS}
        assert objects[0]["size"] == "large" or all(o["size"] == "small" for o in objects)  # largest first


def test_world_json(world_dir, truth):
    with open(os.path.join(world_dir, "world.json")) as f:
        meta = json.load(f)
    assert meta["seed"] == SEED and meta["config"] == CFG.model_dump(mode="json")
    assert meta["noise_counts"] == dict(Counter(truth["noise_type"].to_list()))
    assert meta["vocab"]["shape"] == list(shapes.SHAPES) and len(meta["vocab"]["colour"]) == 6
    assert meta["templates"]["boilerplate"] and meta["templates"]["sentence"]


def world_digest(world_dir: str) -> str:
    """The content of a world's data files (truth rows, images, split members, url list), not their containers."""
    h = hashlib.sha256()
    h.update(json.dumps(pl.read_parquet(os.path.join(world_dir, "truth.parquet")).to_dicts(), sort_keys=True).encode())
    for name in sorted(os.listdir(os.path.join(world_dir, "images"))):
        with open(os.path.join(world_dir, "images", name), "rb") as f:
            h.update(name.encode() + f.read())
    for split in ("val.tar", "test.tar"):
        with tarfile.open(os.path.join(world_dir, split)) as tar:
            for member in tar:
                h.update(member.name.encode() + tar.extractfile(member).read())
    tsv, _ = write_url_list(world_dir, "http://127.0.0.1:9")
    with open(tsv, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def test_shapes_world_keeps_its_bytes(tmp_path):
    """A tiny shapes world (every noise kind, partial captions, failing urls) as it has always been drawn: the
    efficacy results on it stay comparable. A deliberate change to the shapes world updates this digest."""
    build_world(WorldConfig(n_train=60, n_val=8, n_test=8, image_size=32), str(tmp_path), 5)
    assert world_digest(str(tmp_path)) == "bed207dd1f8215feffb53e4c5f954271613d545afbbc76849af500ef4f446183"


def test_same_seed_same_bytes_other_seed_other_world(world_dir, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    build_world(CFG, again, SEED)
    build_world(CFG, other, SEED + 1)
    for name in ("truth.parquet", "val.tar", "test.tar", "world.json"):
        assert digest(os.path.join(world_dir, name)) == digest(os.path.join(again, name)), name
    sample = [f"{i:07d}.jpg" for i in range(0, CFG.n_train, 13)]
    for name in sample:
        assert digest(os.path.join(world_dir, "images", name)) == digest(os.path.join(again, "images", name))
    for name in ("truth.parquet", "val.tar", "test.tar"):
        assert digest(os.path.join(world_dir, name)) != digest(os.path.join(other, name)), name
    differing = sum(digest(os.path.join(world_dir, "images", n)) != digest(os.path.join(other, "images", n))
                    for n in sample)
    assert differing == len(sample)


def test_idempotent_and_rebuilds_when_incomplete_or_changed(world_dir, tmp_path, capsys):
    paths = [os.path.join(world_dir, n) for n in ("world.json", "truth.parquet", "val.tar", "images/0000005.jpg")]
    before = [os.stat(p).st_mtime_ns for p in paths]
    summary = build_world(CFG.model_copy(update={"port": 8123, "host": "localhost"}), world_dir, SEED)
    assert [os.stat(p).st_mtime_ns for p in paths] == before
    assert capsys.readouterr().out == ""
    assert summary["n_train"] == CFG.n_train and summary["dir"] == world_dir
    assert sum(summary["noise_counts"].values()) == CFG.n_train

    small = str(tmp_path / "small")
    build_world(CFG.model_copy(update={"n_train": 40}), small, 1)
    first = digest(os.path.join(small, "truth.parquet"))
    os.remove(os.path.join(small, "world.json"))  # as if killed before the end
    build_world(CFG.model_copy(update={"n_train": 40}), small, 1)
    assert digest(os.path.join(small, "truth.parquet")) == first  # a re-run gives the same bytes
    build_world(CFG.model_copy(update={"n_train": 50}), small, 1)
    assert pl.read_parquet(os.path.join(small, "truth.parquet")).height == 50
    assert len(os.listdir(os.path.join(small, "images"))) == 50
    assert not [n for n in os.listdir(small) if n.endswith(".partial")]


def test_too_much_noise_is_an_error(tmp_path):
    noise = {"swapped_caption": 0.6, "wrong_attribute": 0.3, "boilerplate": 0.1, "near_duplicate": 0.1}
    with pytest.raises(ValueError, match="noise"):
        build_world(WorldConfig(n_train=50, noise=noise), str(tmp_path / "w"), 0)


# ---------------------------------------------------------------- images
def test_images_decode_at_image_size(world_dir):
    for name in os.listdir(os.path.join(world_dir, "images")):
        with Image.open(os.path.join(world_dir, "images", name)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (CFG.image_size, CFG.image_size)


def test_objects_never_overlap():
    for index in range(2000):
        scene = shapes.make_scene(3, world.TRAIN, index, CFG)
        assert not shapes.overlaps(scene["objects"], scene["centres"])
        assert len({o["position"] for o in scene["objects"]}) == len(scene["objects"])


def test_objects_have_their_colour_where_the_truth_says():
    """A single-object image: its object's colour is found at its position, not elsewhere."""
    size = 64
    for index in range(300):
        scene = shapes.make_scene(11, world.VAL, index, CFG)
        if len(scene["objects"]) != 1:
            continue
        pixels = np.asarray(shapes.render(scene, size), np.float32)
        x, y = (int(v * size) for v in scene["centres"][0])
        centre = pixels[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
        assert np.abs(centre - shapes.COLOURS[scene["objects"][0]["colour"]]).max() < 40


# ---------------------------------------------------------------- noise
def test_noise_counts_exact_and_sets_disjoint(truth):
    kinds = Counter(truth["noise_type"].to_list())
    for kind in world.NOISE_TYPES:
        assert kinds[kind] == round(getattr(CFG.noise, kind) * CFG.n_train), kind
    assert set(kinds) <= {"clean", *world.NOISE_TYPES}
    assert truth["noisy"].to_list() == [k != "clean" for k in truth["noise_type"].to_list()]
    assert (truth["noisy"] == (truth["caption"] != truth["clean_caption"])).all()
    dups = truth.filter(pl.col("dup_of") >= 0)
    assert Counter(dups["noise_type"].to_list()) == {"near_duplicate": kinds["near_duplicate"],
                                                     "clean": kinds["near_duplicate"]}
    originals = truth.filter(pl.col("row").is_in(dups["dup_of"].to_list()))
    assert (originals["noise_type"] == "clean").all() and (originals["dup_of"] == -1).all()


def test_swapped_captions_are_permuted_and_describe_other_scenes(truth):
    swapped = truth.filter(pl.col("noise_type") == "swapped_caption")
    assert sorted(swapped["caption"].to_list()) == sorted(swapped["clean_caption"].to_list())
    objects_by_caption: dict[str, list] = {}
    for row in swapped.iter_rows(named=True):
        objects_by_caption.setdefault(row["clean_caption"], []).append(row["objects"])
    for row in swapped.iter_rows(named=True):
        assert row["caption"] != row["clean_caption"]
        assert any(objects != row["objects"] for objects in objects_by_caption[row["caption"]])


def test_derangement_gives_every_target_a_caption_that_does_not_fit():
    """Half the scenes are red, half blue, captions name only the colour: a plain cycle would often fit."""
    objects = [[{"shape": "circle", "colour": "red" if i % 2 else "blue", "size": "small", "position": "left"}]
               for i in range(40)]
    specs = [{"mentions": [{"colour": o[0]["colour"]}]} for o in objects]
    targets = list(range(0, 40, 3))
    donors = world.derange(shapes, targets, specs, objects, np.random.default_rng(0))
    assert sorted(donors) == targets and sorted(donors.values()) == targets
    for target, donor in donors.items():
        assert donor != target and not shapes.describes(specs[donor]["mentions"], objects[target])


def test_wrong_attribute_changes_exactly_one_attribute_word(truth):
    wrong = truth.filter(pl.col("noise_type") == "wrong_attribute")
    assert wrong.height > 0
    for caption, clean in zip(wrong["caption"], wrong["clean_caption"]):
        published, correct = tokens(caption), tokens(clean)
        assert len(published) == len(correct)
        changed = [(a, b) for a, b in zip(published, correct) if a != b]
        assert len(changed) == 1, (caption, clean)
        assert set(changed[0]) <= ATTRIBUTE_WORDS


def test_boilerplate_captions_come_from_the_list(truth):
    pattern = world.boilerplate_regex()
    boiler = truth.filter(pl.col("noise_type") == "boilerplate")
    assert boiler.height > 0
    assert all(pattern.fullmatch(c) for c in boiler["caption"])
    assert not any(pattern.fullmatch(c) for c in truth.filter(~pl.col("noisy"))["caption"])


def test_unrelated_captions_are_real_cc3m_captions_each_used_once(truth, cc3m_tsv):
    listed = [line.split("\t")[0].strip() for line in cc3m_tsv.read_text(encoding="utf-8").splitlines()]
    assert list(world.cc3m_captions()) == list(dict.fromkeys(listed))  # the shipped file: the list's distinct captions
    unrelated = truth.filter(pl.col("noise_type") == "unrelated_caption")
    assert unrelated.height == round(CFG.noise.unrelated_caption * CFG.n_train) > 0
    assert set(unrelated["caption"]) <= set(listed)
    assert unrelated["caption"].n_unique() == unrelated.height  # no caption reused
    others = set(truth.filter(pl.col("noise_type") != "unrelated_caption")["caption"]) | set(truth["clean_caption"])
    assert not others & set(unrelated["caption"])


def test_unrelated_captions_are_seeded():
    targets, avoid = [3, 9, 11], set(world.cc3m_captions()[:5000])
    first = world.unrelated_captions(0, targets, avoid)
    assert first == world.unrelated_captions(0, targets, avoid) != world.unrelated_captions(1, targets, avoid)
    assert sorted(first) == targets and not set(first.values()) & avoid
    noise = {"swapped_caption": 0, "wrong_attribute": 0, "boilerplate": 0, "near_duplicate": 0, "unrelated_caption": 1}
    with pytest.raises(ValueError, match="CC3M list has 15543"):
        world.pick_noise(16_000, WorldConfig(noise=noise), 0)


def test_near_duplicates_are_close_to_their_original_only(world_dir, truth):
    rng = np.random.default_rng(0)
    dups = truth.filter(pl.col("dup_of") >= 0)
    for row, original in zip(dups["row"], dups["dup_of"]):
        image = load(world_dir, row)
        near = np.abs(image - load(world_dir, original)).mean()
        others = [np.abs(image - load(world_dir, int(k))).mean() for k in rng.integers(CFG.n_train, size=10)
                  if k not in (row, original)]
        assert near < 15 and near < 0.5 * np.median(others), (row, near, others)
    by_row = {r["row"]: r for r in truth.iter_rows(named=True)}
    for dup in dups.iter_rows(named=True):
        original = by_row[dup["dup_of"]]
        assert dup["objects"] == original["objects"]
        assert dup["clean_caption"] != original["caption"]  # worded differently
        if dup["noise_type"] == "clean":
            assert dup["caption"] == dup["clean_caption"]
        else:
            assert dup["caption"] != dup["clean_caption"]


# ---------------------------------------------------------------- captions
def test_captions_are_single_line_utf8(truth):
    for caption in truth["caption"].to_list() + truth["clean_caption"].to_list():
        assert caption.strip() and "\t" not in caption and "\n" not in caption and "\r" not in caption
        caption.encode("utf-8")


def test_partial_captions_at_the_configured_rate(truth):
    clean = truth.filter(pl.col("dup_of") == -1)
    assert abs(clean["partial"].mean() - CFG.partial_caption) < 0.1
    for row in clean.iter_rows(named=True):
        words = set(tokens(row["clean_caption"]))
        objects = json.loads(row["objects"])
        every_colour = all(set(shapes.WORDS["colour"][o["colour"]]) & words for o in objects)
        every_shape = all(set(shapes.WORDS["shape"][o["shape"]]) & words for o in objects)
        every_position = all(set(shapes.WORDS["position"][o["position"]]) & words for o in objects)
        if not row["partial"]:
            assert every_colour and every_shape and every_position, row["clean_caption"]
    partial = clean.filter(pl.col("partial"))["clean_caption"].to_list()
    assert any(re.search(r"\b(thing|object|shape|something)\b", c) for c in partial)


def test_attributes_balanced(truth):
    objects = [o for row in truth["objects"] for o in json.loads(row)]
    for attr, values in (("shape", shapes.SHAPES), ("colour", list(shapes.COLOURS)),
                         ("size", list(shapes.SIZES)), ("position", list(shapes.POSITIONS))):
        counts = Counter(o[attr] for o in objects)
        assert set(counts) == set(values)
        expected = len(objects) / len(values)
        assert all(abs(c - expected) < 0.3 * expected for c in counts.values()), (attr, counts)


# ---------------------------------------------------------------- clean splits
def test_val_and_test_tars_are_clean_and_labelled(world_dir, truth):
    train_images = {digest(os.path.join(world_dir, "images", n)) for n in truth["image"]}
    seen = set()
    for name, n in (("val.tar", CFG.n_val), ("test.tar", CFG.n_test)):
        samples = read_split(os.path.join(world_dir, name))
        assert [s["__key__"] for s in samples] == [f"{i:07d}" for i in range(n)]
        for sample in samples:
            assert sample["jpg"].size == (CFG.image_size, CFG.image_size)
            labels, caption = sample["json"], sample["txt"]
            assert {a: labels[a] for a in shapes.ATTRS} == {a: labels["objects"][0][a] for a in shapes.ATTRS}
            assert caption and "\t" not in caption and not world.boilerplate_regex().fullmatch(caption)
            words = set(tokens(caption))
            colours = {c for c, options in shapes.WORDS["colour"].items() if words & set(options)}
            assert colours <= {o["colour"] for o in labels["objects"]}  # never a colour that is not there
            if not labels["partial"]:
                assert words & set(shapes.WORDS["colour"][labels["colour"]]), caption
                assert words & set(shapes.WORDS["shape"][labels["shape"]]), caption
        with tarfile.open(os.path.join(world_dir, name)) as tar:
            seen |= {hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.name.endswith(".jpg")}
    assert len(seen) == CFG.n_val + CFG.n_test and not seen & train_images  # no split shares an image


# ---------------------------------------------------------------- url list
def test_url_list(world_dir, truth):
    base = "http://127.0.0.1:9"
    tsv, parquet = write_url_list(world_dir, base)
    extra = failing_rows(world_dir)
    assert extra == sum(CFG.failing_urls.model_dump().values()) > 0
    with open(tsv, "rb") as f:
        raw = f.read()
    assert b"\r" not in raw and raw.endswith(b"\n")
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert len(lines) == CFG.n_train + extra
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 2 and f[0].startswith(base + "/") and f[1].strip() for f in fields)
    table = pl.read_parquet(parquet)
    assert table.columns == ["url", "caption", "row"] and table.schema["row"] == pl.Int64
    assert table["row"].to_list() == list(range(len(lines)))
    assert [[u, c] for u, c in zip(table["url"], table["caption"])] == fields
    assert table["url"].n_unique() == table.height
    train = table.head(CFG.n_train)
    assert train["url"].to_list() == [f"{base}/images/{i:07d}.jpg" for i in range(CFG.n_train)]
    assert train["caption"].to_list() == truth["caption"].to_list()
    kinds = Counter(u.split("/")[4] for u in table["url"][CFG.n_train:])
    assert kinds == {"404": 3, "500": 3, "timeout": 2, "truncated": 3, "html": 3}


# ---------------------------------------------------------------- the server
def get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_server_serves_images_and_fails_on_purpose(world_dir):
    with open(os.path.join(world_dir, "images", "0000003.jpg"), "rb") as f:
        jpeg = f.read()
    with serve_world(world_dir, timeout_delay=20) as base:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base)
        status, kind, body = get(f"{base}/images/0000003.jpg")
        assert (status, kind, body) == (200, "image/jpeg", jpeg)
        for path, code in (("/images/9999999.jpg", 404), ("/fail/404/0.jpg", 404), ("/fail/500/1.jpg", 500),
                           ("/elsewhere", 404)):
            with pytest.raises(urllib.error.HTTPError) as error:
                get(base + path)
            error.value.close()
            assert error.value.code == code, path

        status, kind, body = get(f"{base}/fail/html/0.jpg")
        assert status == 200 and kind == "image/jpeg" and body.lstrip().lower().startswith(b"<!doctype html")

        with urllib.request.urlopen(f"{base}/fail/truncated/3.jpg", timeout=5) as response:
            assert int(response.headers["Content-Length"]) == len(jpeg)
            with pytest.raises(http.client.IncompleteRead) as error:
                response.read()
            assert 0 < len(error.value.partial) < len(jpeg)

        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)) as error:
            get(f"{base}/fail/timeout/0.jpg", timeout=0.5)
        assert "timed out" in str(error.value)
        started = time.monotonic()  # leave while a handler still stalls
    assert time.monotonic() - started < 5.0


def test_server_handles_hundreds_of_concurrent_requests(world_dir):
    with serve_world(world_dir) as base:
        urls = [f"{base}/images/{i % CFG.n_train:07d}.jpg" for i in range(400)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
            results = list(pool.map(lambda u: get(u, timeout=30)[0], urls))
    assert results == [200] * len(urls)


def test_server_refuses_non_loopback_hosts(world_dir):
    for host in ("0.0.0.0", "192.168.1.10", "8.8.8.8", "::"):
        with pytest.raises(ValueError, match="loopback"), serve_world(world_dir, host=host):
            pass


def test_server_stalls_until_the_delay_then_fails(world_dir):
    with serve_world(world_dir, timeout_delay=0.3) as base, pytest.raises(urllib.error.HTTPError) as error:
        get(f"{base}/fail/timeout/1.jpg", timeout=10)
    error.value.close()
    assert error.value.code == 504


# ---------------------------------------------------------------- the patterns world and the world knobs
PATTERNS_CFG = WorldConfig(kind="patterns", n_train=200, n_val=30, n_test=30, image_size=32,
                           noise={"unrelated_caption": 0.05})
PATTERN_WORDS = {w: (attr, value) for attr, words in patterns.WORDS.items() for value, options in words.items()
                 for w in options} | {w: ("pattern", value) for value, options in patterns.PATTERN_NOUNS.items()
                                       for w in options}


@pytest.fixture(scope="module")
def patterns_dir(tmp_path_factory) -> str:
    return built(tmp_path_factory, PATTERNS_CFG, "patterns")


@pytest.fixture(scope="module")
def patterns_truth(patterns_dir) -> pl.DataFrame:
    return pl.read_parquet(os.path.join(patterns_dir, "truth.parquet"))


def clean_spec(truth: pl.DataFrame, row: int) -> dict:
    """The spec of a row's clean caption, drawn again from the row's own RNG (rows that are not near-duplicates)."""
    objects = json.loads(truth["objects"][row])
    _, spec = patterns.make_caption(objects, np.random.default_rng([SEED, world.TRAIN, row, 1]), PATTERNS_CFG.partial_caption)
    if patterns.render_caption(spec) != truth["clean_caption"][row]:  # a wrong_attribute row that had to say it all
        spec = {**spec, "mentions": objects, "partial": False}
    assert patterns.render_caption(spec) == truth["clean_caption"][row]
    return spec


def test_patterns_world_builds_the_same_bytes_with_its_own_columns(patterns_dir, patterns_truth, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    build_world(PATTERNS_CFG, again, SEED)
    build_world(PATTERNS_CFG, other, SEED + 1)
    assert world_digest(patterns_dir) == world_digest(again) != world_digest(other)
    for name in ("truth.parquet", "val.tar", "test.tar"):
        assert digest(os.path.join(patterns_dir, name)) == digest(os.path.join(again, name)), name
    truth = patterns_truth
    assert truth.columns[:8] == ["row", "image", "caption", "clean_caption", "noisy", "noise_type", "dup_of", "n_objects"]
    assert truth.columns[8:] == [*patterns.VOCAB, "objects", "partial"]
    for row in truth.iter_rows(named=True):
        objects = json.loads(row["objects"])
        assert 1 <= len(objects) == row["n_objects"] <= patterns.MAX_OBJECTS
        assert {a: row[a] for a in patterns.VOCAB} == objects[0]
    kinds = Counter(truth["noise_type"].to_list())
    assert all(kinds[k] == round(getattr(PATTERNS_CFG.noise, k) * PATTERNS_CFG.n_train) > 0 for k in world.NOISE_TYPES)
    with Image.open(os.path.join(patterns_dir, "images", "0000000.jpg")) as image:
        assert image.size == (32, 32)
    with open(os.path.join(patterns_dir, "world.json")) as f:
        meta = json.load(f)
    assert meta["config"]["kind"] == "patterns" and meta["vocab"]["pattern"] == list(patterns.PATTERNS)
    assert sorted(meta["templates"]) == ["alt", "alt_frames", "boilerplate", "listing", "listing_frames"]


def assert_one_attribute_off(caption: str, spec: dict, objects: list[dict]) -> None:
    """`caption` is the spec's caption with one attribute word changed, and no reading of it fits the objects."""
    clean = patterns.render_caption(spec)
    published, correct = caption.split(), clean.split()
    changed = [(a.strip(",;()"), b.strip(",;()")) for a, b in zip(published, correct) if a != b]
    assert len(published) == len(correct) and len(changed) == 1, (caption, clean)
    (new, old), = changed
    assert PATTERN_WORDS[new][0] == PATTERN_WORDS[old][0] and PATTERN_WORDS[new][1] != PATTERN_WORDS[old][1]
    assert patterns.describes(spec["mentions"], objects)
    attr, value = PATTERN_WORDS[new]  # the published caption's mentions: the clean ones with that one value changed
    readings = [mentions for k, m in enumerate(spec["mentions"]) if m.get(attr) == PATTERN_WORDS[old][1]
                for mentions in [[*spec["mentions"][:k], {**m, attr: value}, *spec["mentions"][k + 1:]]]
                if patterns.render_caption({**spec, "mentions": mentions}) == caption]
    assert readings and not any(patterns.describes(mentions, objects) for mentions in readings), caption


def test_patterns_wrong_attribute_changes_one_attribute_and_no_longer_fits(patterns_truth):
    wrong = patterns_truth.filter(pl.col("noise_type") == "wrong_attribute")
    assert wrong.height == 10
    for row, caption in zip(wrong["row"], wrong["caption"]):
        assert_one_attribute_off(caption, clean_spec(patterns_truth, row), json.loads(patterns_truth["objects"][row]))
    made = 0  # and over many scenes, mostly partial captions: the ones a changed word could still fit
    for index in range(400):
        objects = patterns.make_scene(4, world.TRAIN, index, PATTERNS_CFG)["objects"]
        rng = np.random.default_rng([4, index])
        _, spec = patterns.make_caption(objects, rng, 0.7)
        caption = patterns.wrong_attribute(spec, objects, rng)
        if caption is not None:
            assert_one_attribute_off(caption, spec, objects)
            made += 1
    assert made > 350


def test_patterns_swapped_captions_do_not_describe_their_images(patterns_truth):
    swapped = patterns_truth.filter(pl.col("noise_type") == "swapped_caption")
    donors = {c: r for r, c in zip(swapped["row"], swapped["clean_caption"])}
    assert swapped.height == 40
    for row, caption, objects in zip(swapped["row"], swapped["caption"], swapped["objects"]):
        donor = donors[caption]
        assert donor != row
        assert not patterns.describes(clean_spec(patterns_truth, donor)["mentions"], json.loads(objects)), caption


def test_patterns_boilerplate_and_near_duplicates(patterns_dir, patterns_truth):
    pattern = world.boilerplate_regex()
    boiler = patterns_truth.filter(pl.col("noise_type") == "boilerplate")
    assert boiler.height == 10 and all(pattern.fullmatch(c) for c in boiler["caption"])
    dups = patterns_truth.filter(pl.col("noise_type") == "near_duplicate")
    assert dups.height == 4

    def apart(a: np.ndarray, b: np.ndarray) -> float:  # the one-pixel shift undone: a pattern's pixels move with it
        return min(np.abs(a[1:-1, 1:-1] - b[1 + dy:31 + dy, 1 + dx:31 + dx]).mean() for dy in (-1, 0, 1) for dx in (-1, 0, 1))

    for row in dups.iter_rows(named=True):
        original = patterns_truth.row(row["dup_of"], named=True)
        assert row["objects"] == original["objects"] and original["noise_type"] == "clean"
        image = load(patterns_dir, row["row"])
        others = [apart(image, load(patterns_dir, k)) for k in range(0, 200, 20) if k not in (row["row"], row["dup_of"])]
        assert apart(image, load(patterns_dir, row["dup_of"])) < min(15, 0.5 * np.median(others))
        assert row["caption"] not in (row["clean_caption"], original["caption"])


def test_patterns_zero_shot_labels_and_tasks(patterns_dir, tmp_path):
    one = 0
    for name in ("val.tar", "test.tar"):
        for sample in read_split(os.path.join(patterns_dir, name)):
            labels = sample["json"]
            assert {a: labels[a] for a in patterns.VOCAB} == labels["objects"][0]
            if len(labels["objects"]) == 1:
                one += 1
                assert labels["zero_shot"] == {"pattern": labels["pattern"], "colour": labels["colour"]}
            else:
                assert "zero_shot" not in labels
    assert one >= 10
    config = load_config(None, [f"root={tmp_path}", "world.kind=patterns"])
    tasks = config.evaluate.tasks
    assert sorted(tasks) == ["colour", "pattern"]
    assert tasks["pattern"].classnames == list(patterns.PATTERNS) and tasks["colour"].classnames == list(patterns.INKS)
    assert tasks["pattern"].label_field == "zero_shot.pattern" and tasks["pattern"].templates


def test_patterns_ink_share_does_not_give_the_pattern_away():
    """Drawn in white on black without a table, a card's mean brightness is its ink share: half, for every pattern."""
    shares: dict[str, list[float]] = {p: [] for p in patterns.PATTERNS}
    for index in range(250):
        scene = patterns.make_scene(1, world.VAL, index, WorldConfig(kind="patterns", max_objects=1))
        scene["colours"] = [((255, 255, 255), (0, 0, 0))]
        scene["table"] = {"tone": (0, 0, 0), "slope": (0, 0), "grain": 0.0, "grain_seed": 0}
        x0, y0, x1, y1 = (int(np.ceil(v * 32)) if k < 2 else int(v * 32) for k, v in enumerate(scene["boxes"][0]))
        card = np.asarray(patterns.render(scene, 32), np.float32)[y0:y1, x0:x1, 0] / 255
        shares[scene["objects"][0]["pattern"]].append(card.mean())
    for pattern, values in shares.items():
        assert len(values) > 20 and abs(np.mean(values) - 0.5) < 0.02, (pattern, np.mean(values))


def test_patterns_swatches_are_where_the_truth_says():
    """Inside a one-swatch image's card: its ink and ground colours, half and half; around it: the darker table."""
    size = 64
    for index in range(40):
        scene = patterns.make_scene(11, world.VAL, index, WorldConfig(kind="patterns", max_objects=1))
        pixels = np.asarray(patterns.render(scene, size), np.float32)
        obj, (ink, ground) = scene["objects"][0], scene["colours"][0]
        x0, y0, x1, y1 = (int(v * size) for v in patterns.CARDS[obj["position"]])
        card = pixels[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3).mean(0)
        assert np.abs(card - (np.array(ink) + ground) / 2).max() < 20, (index, card, ink, ground)
        outside = np.ones((size, size), bool)
        outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
        assert pixels[outside].mean() < np.mean(ground) - 30  # the table, darker than any ground


def test_max_objects_caps_the_scenes_and_keeps_the_proportions():
    counts = Counter(len(shapes.make_scene(2, world.TRAIN, i, WorldConfig(max_objects=2))["objects"])
                     for i in range(3000))
    assert set(counts) == {1, 2} and abs(counts[1] / 3000 - 0.27 / 0.78) < 0.03  # 1 or 2 at 27:51
    for i in range(50):  # the kind's most is the default
        assert shapes.make_scene(2, world.TRAIN, i, WorldConfig(max_objects=3)) == shapes.make_scene(2, world.TRAIN, i, CFG)
    for gen, kind in ((shapes, "shapes"), (patterns, "patterns")):
        cfg = WorldConfig(kind=kind, max_objects=1)
        assert all(len(gen.make_scene(2, split, i, cfg)["objects"]) == 1 for split in (world.TRAIN, world.TEST)
                   for i in range(300))


def test_max_objects_one_world_labels_every_eval_image(tmp_path):
    build_world(WorldConfig(kind="patterns", max_objects=1, n_train=20, n_val=10, n_test=0, image_size=32),
                str(tmp_path), 1)
    truth = pl.read_parquet(os.path.join(tmp_path, "truth.parquet"))
    assert (truth["n_objects"] == 1).all()
    assert all("zero_shot" in s["json"] for s in read_split(os.path.join(tmp_path, "val.tar")))


def test_world_kind_and_max_objects_are_checked():
    with pytest.raises(ConfigError, match=r"world.kind.*unknown world kind 'cubes' \(known: shapes, patterns\)"):
        load_config(None, ["world.kind=cubes"])
    with pytest.raises(ConfigError, match=r"world.max_objects.*the patterns world holds 1 to 2 objects"):
        load_config(None, ["world.kind=patterns", "world.max_objects=3"])
    with pytest.raises(ConfigError, match=r"world.max_objects.*greater than or equal to 1"):
        load_config(None, ["world.max_objects=0"])
    assert load_config(None, ["world.max_objects=3"]).world.max_objects == 3


def test_the_changed_attribute_of_every_wrong_attribute_caption_is_named(truth, patterns_truth):
    """bench/partial_captions.py splits one wrong attribute by the attribute changed: every such caption of
    both worlds names one, and it is the attribute whose value differs from the true caption's."""
    spec = importlib.util.spec_from_file_location("partial_captions", ROOT / "bench" / "partial_captions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kind, table in (("shapes", truth), ("patterns", patterns_truth)):
        words = bench.word_attributes(kind)
        wrong = table.filter(pl.col("noise_type") == "wrong_attribute")
        named = [bench.changed_attribute(c, t, words) for c, t in zip(wrong["caption"], wrong["clean_caption"])]
        assert wrong.height > 0 and "other" not in named, (kind, named)
        for caption, clean, attr in zip(wrong["caption"], wrong["clean_caption"], named):
            published = next(a for a, b in zip(caption.split(), clean.split()) if a != b).strip(",.;()")
            assert words[published] == attr  # the published word names the same attribute, with another value

