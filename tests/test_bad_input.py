"""The bad-input corpus (tests/corpus.py) through the real stages: every row accounted with a reason,
decodable oddities stored as RGB, nothing escapes the output folder, downstream stages skip and count
what is broken, captions stay text on the audit page, and untrusted urls cannot reach internal addresses.
"""

import io
import json
import math
import re
import shutil
import socket
import subprocess
import tarfile
import urllib.error
import urllib.request
from html.parser import HTMLParser

import corpus
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import BIN, ROOT, run_shard
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.fetch import BoundedResizer, public_opener
from pipelines.io import score_facts
from pipelines.shard import failure_reason
from pipelines.urllist import INTERNAL_HOST, InputError, read_url_list, validate_rows
from pipelines.world_server import serve_world

PER_SHARD = 6  # shards 0 and 1 hold the successes, 2 and 3 only failures


def shard_config(root, url_list, *extra):
    return load_config(None, [f"root={root}", f"shard.input.path={url_list}", "shard.input.format=cc12m",
                              "shard.processes=1", "shard.threads=8", f"shard.samples_per_shard={PER_SHARD}",
                              "shard.image_size=64", "shard.timeout=2", *extra])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The corpus served on loopback, its url list sharded by the real shard stage: (base, rows, summary)."""
    base = tmp_path_factory.mktemp("bad_input")
    (base / "served" / "images").mkdir(parents=True)
    for name, data in corpus.images().items():
        (base / "served" / "images" / name).write_bytes(data)
    with serve_world(str(base / "served"), timeout_delay=20) as url:
        rows = corpus.url_rows(url)
        (base / "list.tsv").write_bytes(b"\n".join(line for line, _ in rows) + b"\n")
        summary = run_shard(shard_config(base / "root", base / "list.tsv", "shard.allow_private_urls=true"))
    return base, rows, summary


def samples(shard_dir):
    return [s for tar in sorted(shard_dir.glob("0*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)]


@pytest.mark.slow
def test_every_row_ends_as_a_sample_or_a_failure_with_its_reason(sharded):
    base, rows, summary = sharded
    shards = base / "root" / "shards"
    tables = [pl.read_parquet(p, columns=["row", "status", "error_message"]) for p in sorted(shards.glob("0*.parquet"))]
    tables.append(pl.read_parquet(shards / "_rejected.parquet").select("row", "status", "error_message"))
    outcome = {row: (status, None if status == "success" else failure_reason(error))
               for row, status, error in pl.concat(tables).iter_rows()}
    assert outcome == {i: expected for i, (_, expected) in enumerate(rows)}
    counts = summary["counts"]
    assert counts["input_rows"] == len(rows) == counts["successes"] + counts["failures"]
    assert not summary["incomplete_shards"]


@pytest.mark.slow
def test_odd_images_are_stored_as_rgb_and_captions_as_they_were(sharded):
    base, rows, _ = sharded
    stored = {s["__key__"]: s for s in samples(base / "root" / "shards")}
    by_row = {json.loads(s["json"])["row"]: s for s in stored.values()}
    for row, (line, (status, _)) in enumerate(rows):
        name = line.decode("utf-8", "replace").partition("\t")[0].rsplit("/", 1)[-1]
        if status == "success" and name in corpus.EXPECTED_COLOURS:
            image = np.asarray(Image.open(io.BytesIO(by_row[row]["jpg"])).convert("RGB"), np.int16)
            assert image.shape == (64, 64, 3), name  # border: 64 x 48 in the middle, white above and below
            middle = image[12:52]
            regions = {"all": middle, "left": middle[:, :28], "right": middle[:, -28:]}
            for region, colour in corpus.EXPECTED_COLOURS[name].items():
                assert np.abs(regions[region].mean((0, 1)) - colour).max() < 8, (name, region)
    captions = {by_row[r]["txt"].decode("utf-8") for r in by_row}
    for caption in (corpus.LONG_CAPTION, corpus.SCRIPT_CAPTION, corpus.RTL_EMOJI_CAPTION, corpus.PATH_CAPTION):
        assert caption.strip() in captions


@pytest.mark.slow
def test_no_output_path_comes_from_sample_content(sharded):
    """Keys are img2dataset's (shard id, index in the input shard); urls and captions never name a file."""
    base, rows, _ = sharded
    root = base / "root"
    names = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    allowed = re.compile(r"^(manifest\.json|shards|shards/(\d{5}(\.tar|\.parquet|_stats\.json)|_[a-z]+\.(parquet|json|yaml)))$")
    assert all(allowed.match(n) for n in names), sorted(n for n in names if not allowed.match(n))
    valid = pl.read_parquet(root / "shards" / "_input.parquet")["row"].to_list()
    digits = math.ceil(math.log10(PER_SHARD))  # img2dataset's oom_sample_per_shard
    expected_keys = {row: f"{i // PER_SHARD:05d}{i % PER_SHARD:0{digits}d}" for i, row in enumerate(valid)}
    for tar in sorted((root / "shards").glob("0*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                assert re.fullmatch(rf"\d{{{5 + digits}}}\.(jpg|txt|json)", member.name) and member.isfile(), member.name
    for sample in samples(root / "shards"):
        assert sample["__key__"] == expected_keys[json.loads(sample["json"])["row"]]


def truncated_copy(shard_dir, dest):
    """The corpus shards with shard 0's tar cut in the middle of a member (a killed copy)."""
    shutil.copytree(shard_dir, dest)
    tar = (dest / "00000.tar").read_bytes()
    (dest / "00000.tar").write_bytes(tar[: len(tar) // 2 + 100])
    return dest


@pytest.mark.slow
def test_training_skips_and_counts_undecodable_and_truncated_shards(sharded, tmp_path, caplog):
    from train.data import make_pipeline, nonempty_shards, tar_is_complete
    from train.models import create_model

    base, _, _ = sharded
    shards = truncated_copy(base / "root" / "shards", tmp_path / "root" / "shards")
    urls = sorted(str(p) for p in shards.glob("0*.tar"))
    assert [tar_is_complete(u) for u in urls] == [False] + [True] * (len(urls) - 1)
    kept = nonempty_shards(urls)
    assert urls[0] not in kept and "left out 1 truncated shard(s)" in caplog.text
    # Read anyway, the truncated tar gives what it holds and the loader goes on to the next shard.
    _, _, preprocess, tokenizer = create_model("softcurate-tiny")
    batches = list(make_pipeline(urls, preprocess, tokenizer, batch_size=4))
    keys = [k for b in batches for k in b["key"]]
    whole = {s["__key__"] for s in samples(base / "root" / "shards")}
    assert set(keys) < whole and len(keys) == len(set(keys))
    assert all(b["image"].shape[1:] == (3, 64, 64) for b in batches)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained softcurate-tiny saved as a checkpoint: enough to embed (the scores are not the point here)."""
    import torch

    from train.models import create_model

    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.save(create_model("softcurate-tiny")[0].state_dict(), path)
    return {"model": "softcurate-tiny", "checkpoints": [str(path)], "digests": ["x"], "sentence_teacher": None,
            "device": "cpu", "bf16": False}


@pytest.mark.slow
def test_score_counts_samples_a_truncated_tar_lost(sharded, teacher, tmp_path):
    from pipelines.score_tasks import MISSING, embed_shard

    base, _, _ = sharded
    shards = truncated_copy(base / "root" / "shards", tmp_path / "root" / "shards")
    result = embed_shard(str(shards / "00000.tar"), str(tmp_path / "embed.parquet"), teacher, 8, 1)
    table = pl.read_parquet(tmp_path / "embed.parquet")
    listed = pl.read_parquet(shards / "00000.parquet").filter(pl.col("status") == "success")
    assert sorted(table["key"]) == sorted(listed["key"])  # every sample of the shard has its row
    failed = table.filter(pl.col("status") == "failed")
    assert 0 < failed.height < table.height and result["failed"] == failed.height
    assert set(failed["error"]) <= {MISSING, "no caption in the sample", "no image in the sample"}
    assert failed["row"].is_not_null().all()
    # An intact shard of the corpus: every success embeds (the odd kinds were re-encoded by the shard stage).
    embed_shard(str(base / "root" / "shards" / "00001.tar"), str(tmp_path / "whole.parquet"), teacher, 8, 1)
    assert (pl.read_parquet(tmp_path / "whole.parquet")["status"] == "scored").all()


@pytest.mark.slow
def test_scores_of_another_run_are_refused(sharded, tmp_path):
    from train.data import check_scores

    base, _, _ = sharded
    root = tmp_path / "root"
    shutil.copytree(base / "root" / "shards", root / "shards")
    (root / "scores").mkdir()
    keys = pl.read_parquet(root / "shards" / "00000.parquet").filter(pl.col("status") == "success")["key"]
    pq.write_table(pa.table({"key": [str(int(k) + 500) for k in keys], "clean_prob": [0.9] * len(keys)}),
                   root / "scores" / "00000.parquet")
    with pytest.raises(KeyError, match=r"00000.parquet: no scores for \d+ of the \d+ samples .*scores file of another run"):
        check_scores([str(root / "shards" / "00000.tar")])


class Text(HTMLParser):
    def __init__(self, html):
        super().__init__()
        self.text, self.tags = [], []
        self.feed(html)

    def handle_data(self, data):
        self.text.append(data)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.slow
def test_audit_page_shows_corpus_captions_as_text(sharded):
    from test_report import FACTS

    from curate.report import render_page

    base, _, _ = sharded
    stored = samples(base / "root" / "shards")
    items = [{"key": s["__key__"], "caption": s["txt"].decode("utf-8")[:300], "url": json.loads(s["json"])["url"],
              "clean_prob": 0.5, "cosine": 0.3, "group": None} for s in stored]
    page = render_page(FACTS, {}, {"mismatches": items}, {s["__key__"]: s["jpg"] for s in stored})
    parsed = Text(page)
    assert not [t for t, _ in parsed.tags if t in ("script", "iframe", "object", "embed")]
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
    text = "".join(parsed.text)
    for caption in (corpus.SCRIPT_CAPTION, corpus.RTL_EMOJI_CAPTION, corpus.PATH_CAPTION):
        assert caption in text  # shown as the text it is, not as markup


# ---------------------------------------------------------------- untrusted urls and internal addresses
def test_literal_internal_hosts_are_rejected_rows_with_a_hint(tmp_path, capsys):
    hosts = ["127.0.0.1:8000", "localhost", "x.localhost", "169.254.169.254", "10.1.2.3", "192.168.1.1", "[::1]",
             "[fd00::1]", "[fe80::1]", "[::ffff:127.0.0.1]", "2130706433", "127.1", "0.0.0.0", "user@[::1]:80"]
    lines = [f"http://{h}/a.jpg\tinternal {i}" for i, h in enumerate(hosts)]
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    summary = run_shard(shard_config(tmp_path / "root", tmp_path / "list.tsv"))
    rejected = pl.read_parquet(tmp_path / "root" / "shards" / "_rejected.parquet")
    assert rejected["row"].to_list() == list(range(len(hosts)))
    assert set(rejected["error_message"]) == {INTERNAL_HOST}
    out = capsys.readouterr().out
    assert f"refused {len(hosts)} urls whose host is loopback" in out and "--allow-private-urls" in out
    assert summary["counts"]["rejected"] == len(hosts) and summary["counts"]["attempted"] == 0
    allowed, _ = validate_rows(read_url_list(str(tmp_path / "list.tsv"), "cc12m"), allow_private=True)
    assert allowed.height == len(lines)


def test_the_demo_world_needs_the_option(tmp_path):
    config = load_config(None, [f"root={tmp_path}", "world.n_train=5"])
    with pytest.raises(ConfigError, match="demo world is served on loopback.*shard.allow_private_urls: true"):
        run_shard(config)
    assert load_config(ROOT / "configs" / "demo.yaml").shard.allow_private_urls


def test_names_resolving_to_internal_addresses_are_refused_at_connect():
    """The guard img2dataset downloads through: a name (localhost) that resolves to loopback is refused
    before a connection is made; the same url goes through when private urls are allowed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for url in (f"http://localhost:{port}/a.jpg", f"http://127.0.0.1:{port}/a.jpg", f"https://127.0.0.1:{port}/"):
            with pytest.raises(urllib.error.URLError, match="resolves to an internal address"):
                public_opener().open(url, timeout=2)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
        with pytest.raises(OSError):  # the default opener does connect (then times out: nobody answers)
            urllib.request.build_opener().open(f"http://127.0.0.1:{port}/a.jpg", timeout=0.5)
        listener.accept()[0].close()


def test_decoder_refuses_by_header_before_decoding():
    resizer = BoundedResizer(image_size=16, resize_mode="keep_ratio", resize_only_if_bigger=False, encode_quality=90,
                             encode_format="jpg", max_decode_pixels=100 * 100)
    small, large = (Image.new("RGB", size, (1, 2, 3)) for size in ((100, 100), (101, 100)))
    assert resizer(io.BytesIO(corpus.encode(small, "PNG")))[-1] is None
    assert resizer(io.BytesIO(corpus.encode(large, "PNG")))[-1].startswith("image too large to decode")


# ---------------------------------------------------------------- malformed url lists
def test_malformed_parquet_is_a_clear_error_or_rejected_rows(tmp_path):
    path = str(tmp_path / "bin.parquet")
    pq.write_table(pa.table({"url": pa.array([b"http://x.org/a.jpg", b"http://x.org/b.jpg"]),
                             "caption": pa.array([b"fine", b"caf\xe9"])}), path)
    valid, rejected = validate_rows(read_url_list(path))  # binary columns: decoded like the TSV is
    assert valid["caption"].to_list() == ["fine"] and rejected["error_message"].to_list() == ["caption is not valid UTF-8"]
    pq.write_table(pa.table({"url": [["http://x.org/a.jpg"]], "caption": ["a"]}), tmp_path / "nested.parquet")
    with pytest.raises(InputError, match=r"nested.parquet: column 'url' holds List\(String\), not text"):
        read_url_list(str(tmp_path / "nested.parquet"))
    pq.write_table(pa.table({"url": [1, 2], "caption": [1.5, None]}), tmp_path / "numbers.parquet")
    _, rejected = validate_rows(read_url_list(str(tmp_path / "numbers.parquet")))
    assert rejected["error_message"].to_list() == ["unsupported url scheme"] * 2
    whole = (tmp_path / "numbers.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "zero.parquet").write_bytes(b"")
    for name in ("cut.parquet", "zero.parquet"):
        with pytest.raises(InputError, match=f"{name}: cannot read as parquet: "):
            read_url_list(str(tmp_path / name))
    # On the command line each is one line on stderr, exit 2.
    result = subprocess.run([str(BIN / "softcurate"), "shard", "--input", str(tmp_path / "nested.parquet"),
                             "--root", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "not text" in result.stderr


def test_ragged_csv_and_a_byte_order_mark(tmp_path):
    (tmp_path / "ragged.csv").write_text("url,caption\nhttp://x.org/a.jpg,a\nhttp://x.org/b.jpg,b,extra\n")
    with pytest.raises(InputError, match=r"ragged.csv: cannot read as csv: "):
        read_url_list(str(tmp_path / "ragged.csv"))
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbfhttp://x.org/a.jpg\tfirst\nhttp://x.org/b.jpg\tsecond\n")
    valid, rejected = validate_rows(read_url_list(str(tmp_path / "bom.tsv")))
    assert valid["url"].to_list() == ["http://x.org/a.jpg", "http://x.org/b.jpg"] and rejected.height == 0


@pytest.mark.parametrize("keys", [["1", "22"], ["a1", "b2"]])
def test_keys_that_are_not_img2datasets_stop_a_policy_with_one_line(tmp_path, keys):
    pl.DataFrame({"key": keys, "cosine": [0.1, 0.2]}).write_parquet(tmp_path / "00000.parquet")
    config = load_config(None, [f"root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"sample keys must be img2dataset's \(digits of one width\)"):
        score_facts(config, [str(tmp_path / "00000.parquet")], [{"kind": "cosine_top", "fraction": 0.5}])
