"""Evaluation: zero-shot and retrieval with the dot product and DN, on features with known answers,
then the CLI on a demo world's test split, a labelled WebDataset and an image folder, for stock and
oblique checkpoints."""

import io
import json
import subprocess

import polars as pl
import pytest
import torch
import webdataset as wds
from conftest import BIN
from PIL import Image

from train.evaluate import dn_means, retrieval, retrieval_recall, tokens, with_dn, zero_shot


def test_zero_shot_and_retrieval_on_known_features():
    classes = tokens(torch.eye(4)[:, None, :])  # four orthogonal classes, K = 1
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    image = tokens(torch.eye(4)[labels][:, None, :] + 0.1)
    assert zero_shot(image, classes, labels) == {"top1": 1.0, "top5": 1.0}
    wrong = zero_shot(image, classes, torch.tensor([1, 0, 3, 2, 0, 3]), ks=(1, 2))
    assert wrong["top1"] == 0.0
    text = image.clone()
    assert retrieval(image, text, ks=(1,))["i2t_R@1"] < 1.0  # rows 1 and 4 are identical: a tie counts against
    assert retrieval(image[:4], text[:4], ks=(1,)) == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


def test_dn_removes_a_shared_offset_that_the_dot_product_cannot():
    """Every image carries a large common direction that class 0's prompt shares: the dot product sends
    every image to class 0; DN (lambda = 1) removes the common part and classification recovers."""
    torch.manual_seed(0)
    shared = torch.zeros(8)
    shared[7] = 1.0
    classes = tokens((torch.eye(8)[:4] + 2.0 * torch.outer(torch.tensor([1.0, 0, 0, 0]), shared))[:, None, :])
    labels = torch.arange(4).repeat(25)
    image = tokens((torch.eye(8)[labels] * 0.3 + 3.0 * shared + 0.05 * torch.randn(100, 8))[:, None, :])
    means = (image.mean(0), classes.mean(0))
    dot = zero_shot(image, classes, labels, ks=(1,))["top1"]
    dn = zero_shot(image, classes, labels, ks=(1,), means=means, lam=1.0)["top1"]
    assert dot == pytest.approx(0.25) and dn == 1.0
    assert zero_shot(image, classes, labels, ks=(1,), means=means, lam=0.0)["top1"] == dot  # lambda 0 is the dot


def test_oblique_features_score_as_the_sum_over_tokens():
    torch.manual_seed(1)
    u, v = tokens(torch.randn(5, 4, 3)), tokens(torch.randn(5, 4, 3))
    assert retrieval_recall(u, v) == retrieval_recall(u.flatten(1), v.flatten(1))


def test_dn_spread_over_seeds():
    torch.manual_seed(2)
    image, text = tokens(torch.randn(300, 1, 6)), tokens(torch.randn(300, 1, 6))
    means = [dn_means(image, text, 100, seed) for seed in range(5)]
    assert not torch.equal(means[0][0], means[1][0])
    result = with_dn(retrieval, means, image=image[:50], text=image[:50] + 0.01, lam=0.5, ks=(1,))
    assert set(result) == {"dot", "dn", "dn_std"} and result["dot"]["i2t_R@1"] == 1.0
    assert result["dn_std"]["i2t_R@1"] >= 0.0


# ---------------------------------------------------------------- the CLI on real splits and checkpoints
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip

    import train.models  # noqa: F401  (registers softcurate-tiny)
    from pipelines.config import WorldConfig
    from pipelines.world import build_world
    from train.models import save_checkpoint
    from train.oblique import make_oblique, save_oblique

    root = tmp_path_factory.mktemp("evaluate")
    build_world(WorldConfig(n_train=10, n_val=120, n_test=150, failing_urls={"http_404": 0, "http_500": 0, "timeout": 0,
                                                                              "truncated": 0, "html": 0}), str(root / "world"), 0)
    torch.manual_seed(0)
    save_checkpoint(open_clip.create_model("softcurate-tiny"), root / "stock.pt")
    save_oblique(make_oblique(open_clip.create_model("softcurate-tiny"), 4), root / "oblique.pt", model_name="softcurate-tiny")
    return root


def evaluate(*args):
    return subprocess.run([str(BIN / "softcurate"), "evaluate", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_on_the_world_split_for_stock_and_oblique_checkpoints(setup):
    root = setup
    result = evaluate("--root", str(root), "--set", f"world.dir={root}/world", "--set", "world.n_train=10",
                      "--checkpoints", str(root / "stock.pt"), str(root / "oblique.pt"), "--dn-seeds", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "zero-shot colour top1" in result.stdout and "retrieval t2i_R@10" in result.stdout
    stock = json.loads((root / "eval" / "stock.json").read_text())
    oblique = json.loads((root / "eval" / "oblique.json").read_text())
    assert stock["oblique_k"] == 1 and oblique["oblique_k"] == 4
    assert stock["pairs"] == 150 and stock["zero_shot"]["colour"]["classes"] == 6
    for scores in (stock["zero_shot"]["colour"], stock["retrieval"]):
        assert {"dot", "dn", "dn_std"} <= set(scores) and all(0 <= v <= 1 for v in scores["dot"].values())


@pytest.mark.slow
def test_cli_on_a_labelled_webdataset_and_an_image_folder(setup, tmp_path):
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    with wds.TarWriter(str(tmp_path / "labelled.tar")) as sink:
        for i in range(20):
            name = list(colours)[i % 2]
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), colours[name]).save(buf, "JPEG")
            sink.write({"__key__": f"{i:04d}", "jpg": buf.getvalue(), "txt": f"a {name} square", "json": {"label": name}})
            folder = tmp_path / "folder" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    labelled = evaluate("--root", str(tmp_path), "--checkpoints", str(setup / "stock.pt"), "--data", str(tmp_path / "labelled.tar"),
                        "--label-field", "label", "--classnames", str(tmp_path / "classes.txt"), "--dn-samples", "10")
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "stock.json").read_text())
    assert result["zero_shot"]["label"]["dot"]["top1"] in (0.5, 0.0, 1.0)  # one colour per class: all or nothing per class
    folder = evaluate("--root", str(tmp_path), "--checkpoints", str(setup / "stock.pt"), "--folder", str(tmp_path / "folder"),
                      "--output", str(tmp_path / "folder_eval"), "--dn-samples", "10")
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert "zero-shot folder top1" in folder.stdout
    missing = evaluate("--root", str(tmp_path), "--checkpoints", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr


@pytest.mark.slow
def test_cli_on_shards_made_from_a_csv_with_a_numeric_label_column(setup, tmp_path):
    """A CSV's extra columns reach the json as strings: a label of digits is a class index, a label that is
    neither an index nor a class name is a one-line error."""
    from pipelines.world import VOCAB
    from pipelines.world_server import serve_world

    colours = list(VOCAB["colour"])
    truth = pl.read_parquet(setup / "world" / "truth.parquet")
    digits = [str(colours.index(c)) for c in truth["colour"]]
    (tmp_path / "classes.txt").write_text("\n".join(colours) + "\n")
    with serve_world(str(setup / "world")) as url:
        pl.DataFrame({"url": [f"{url}/images/{name}" for name in truth["image"]], "caption": truth["clean_caption"],
                      "digit": digits, "colour": truth["colour"], "bad": digits[:-1] + [str(len(colours))]}
                     ).write_csv(tmp_path / "urls.csv")
        shard = subprocess.run([str(BIN / "softcurate"), "shard", "--input", str(tmp_path / "urls.csv"), "--root", str(tmp_path),
                                "--set", "shard.input.extra_cols=[digit, colour, bad]", "--processes", "1", "--threads", "4",
                                "--image-size", "64", "--allow-private-urls"], capture_output=True, text=True, timeout=300)
    assert shard.returncode == 0, shard.stderr[-2000:]

    def labelled(field):
        return evaluate("--root", str(tmp_path), "--checkpoints", str(setup / "stock.pt"), "--data",
                        str(tmp_path / "shards" / "00000.tar"), "--set", f"evaluate.label_field={field}", "--classnames",
                        str(tmp_path / "classes.txt"), "--dn-samples", "5", "--output", str(tmp_path / field))

    for field in ("digit", "colour"):
        result = labelled(field)
        assert result.returncode == 0, result.stderr[-2000:]
    by_index, by_name = (json.loads((tmp_path / f / "stock.json").read_text()) for f in ("digit", "colour"))
    assert by_index["pairs"] == truth.height and 0 <= by_index["zero_shot"]["digit"]["dot"]["top1"] <= 1
    assert by_index["zero_shot"]["digit"] == by_name["zero_shot"]["colour"]  # index i is the i-th class name
    bad = labelled("bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"softcurate evaluate: error: evaluate: label '{len(colours)}' of evaluate.label_field=bad is neither a class "
        f"index (0 to {len(colours) - 1}) nor one of the {len(colours)} class names"]
