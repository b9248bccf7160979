"""The demo world: determinism, exact injected noise, clean splits, the url list and the loopback server."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import http.client
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
from PIL import Image

from pipelines import world
from pipelines.config import WorldConfig
from pipelines.world import build_world, failing_rows, write_url_list
from pipelines.world_server import serve_world

SEED = 7
CFG = WorldConfig(n_train=300, n_val=20, n_test=20, noise={"unrelated_caption": 0.05})
ATTRIBUTE_WORDS = {w for words in world.WORDS.values() for options in words.values() for w in options} \
    | set(world.SHAPE_ADJECTIVES.values())


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("world") / "w")
    build_world(CFG, out, SEED)
    return out


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
        assert {a: objects[0][a] for a in world.ATTRS} == {a: row[a] for a in world.ATTRS}
        assert objects[0]["size"] == "large" or all(o["size"] == "small" for o in objects)  # largest first


def test_world_json(world_dir, truth):
    with open(os.path.join(world_dir, "world.json")) as f:
        meta = json.load(f)
    assert meta["seed"] == SEED and meta["config"] == CFG.model_dump(mode="json")
    assert meta["noise_counts"] == dict(Counter(truth["noise_type"].to_list()))
    assert meta["vocab"]["shape"] == list(world.SHAPES) and len(meta["vocab"]["colour"]) == 6
    assert meta["templates"]["boilerplate"] and meta["templates"]["sentence"]


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
        scene = world.make_scene(3, world.TRAIN, index)
        assert not world.overlaps(scene["objects"], scene["centres"])
        assert len({o["position"] for o in scene["objects"]}) == len(scene["objects"])


def test_objects_have_their_colour_where_the_truth_says():
    """A single-object image: its object's colour is found at its position, not elsewhere."""
    size = 64
    for index in range(300):
        scene = world.make_scene(11, world.VAL, index)
        if len(scene["objects"]) != 1:
            continue
        pixels = np.asarray(world.render(scene, size), np.float32)
        x, y = (int(v * size) for v in scene["centres"][0])
        centre = pixels[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
        assert np.abs(centre - world.COLOURS[scene["objects"][0]["colour"]]).max() < 40


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
    donors = world.derange(targets, specs, objects, np.random.default_rng(0))
    assert sorted(donors) == targets and sorted(donors.values()) == targets
    for target, donor in donors.items():
        assert donor != target and not world.describes(specs[donor]["mentions"], objects[target])


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
        every_colour = all(set(world.WORDS["colour"][o["colour"]]) & words for o in objects)
        every_shape = all(set(world.WORDS["shape"][o["shape"]]) & words for o in objects)
        every_position = all(set(world.WORDS["position"][o["position"]]) & words for o in objects)
        if not row["partial"]:
            assert every_colour and every_shape and every_position, row["clean_caption"]
    partial = clean.filter(pl.col("partial"))["clean_caption"].to_list()
    assert any(re.search(r"\b(thing|object|shape|something)\b", c) for c in partial)


def test_attributes_balanced(truth):
    objects = [o for row in truth["objects"] for o in json.loads(row)]
    for attr, values in (("shape", world.SHAPES), ("colour", list(world.COLOURS)),
                         ("size", list(world.SIZES)), ("position", list(world.POSITIONS))):
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
            assert {a: labels[a] for a in world.ATTRS} == {a: labels["objects"][0][a] for a in world.ATTRS}
            assert caption and "\t" not in caption and not world.boilerplate_regex().fullmatch(caption)
            words = set(tokens(caption))
            colours = {c for c, options in world.WORDS["colour"].items() if words & set(options)}
            assert colours <= {o["colour"] for o in labels["objects"]}  # never a colour that is not there
            if not labels["partial"]:
                assert words & set(world.WORDS["colour"][labels["colour"]]), caption
                assert words & set(world.WORDS["shape"][labels["shape"]]), caption
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
