"""Evaluation: zero-shot and retrieval with the dot product and DN, on features with known answers,
then the CLI on a demo world's test split, a labelled WebDataset and an image folder, for stock and
oblique checkpoints."""

import io
import json
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
import webdataset as wds
from conftest import BIN
from PIL import Image

from train.evaluate import retrieval, retrieval_recall, sample_means, tokens, with_dn, zero_shot


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
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(5, 4))  # each token on its own sphere
    assert retrieval_recall(u, v) == retrieval_recall(u.flatten(1), v.flatten(1))


def test_dn_spread_over_seeds_is_the_mean_and_sample_std_of_the_runs():
    """with_dn runs the metric once with the dot product and once per seed's means: "dn" is the mean of
    those runs, "dn_std" their sample standard deviation (n - 1), both recomputed here from the hand formula."""
    image, text, mu_v, mu_t = retrieval_case()
    draws = [(mu_v, mu_t), (mu_t, mu_v), (2 * mu_v, 0 * mu_t)]
    runs = [hand_recall_at_1(hand_dn_similarity(image, text, a, b, 0.5)) for a, b in draws]
    assert len(set(runs)) > 1  # the draws disagree, so the spread is not zero
    result = with_dn(retrieval, [(as_tokens(a), as_tokens(b)) for a, b in draws],
                     image=as_tokens(image), text=as_tokens(text), lam=0.5, ks=(1,))
    assert result["dot"] == pytest.approx(dict(zip(("i2t_R@1", "t2i_R@1"), hand_recall_at_1(image @ text.T))))
    for j, name in enumerate(("i2t_R@1", "t2i_R@1")):
        values = [r[j] for r in runs]
        assert result["dn"][name] == pytest.approx(np.mean(values), abs=1e-7)
        assert result["dn_std"][name] == pytest.approx(np.std(values, ddof=1), abs=1e-7)
    one = with_dn(retrieval, [(as_tokens(mu_v), as_tokens(mu_t))], image=as_tokens(image), text=as_tokens(text), ks=(1,))
    assert one["dn_std"] == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}


def test_dn_means_are_means_of_seeded_samples_of_each_modality():
    # each row's first coordinate is a distinct power of two: n * mean reads back which rows were drawn
    image = torch.zeros(12, 1, 3, dtype=torch.float64)
    image[:, 0, 0] = 2.0 ** torch.arange(12, dtype=torch.float64)
    text = -image.clone()
    full_v, full_t = sample_means(image, text, 12, seed=3)
    torch.testing.assert_close(full_v, image.mean(0))
    torch.testing.assert_close(full_t, text.mean(0))
    mu_v, mu_t = sample_means(image, text, 5, seed=3)
    assert mu_v.shape == (1, 3) and mu_v[0, 0] > 0 > mu_t[0, 0]  # image mean from images, text mean from texts
    for mu in (mu_v, -mu_t):
        assert bin(round(5 * mu[0, 0].item())).count("1") == 5  # five distinct rows
    assert torch.equal(sample_means(image, text, 5, seed=3)[0], mu_v)  # seeded
    assert not torch.equal(sample_means(image, text, 5, seed=4)[0], mu_v)


# ---------------------------------------------------------------- DN against the formula written out by hand
def nrm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def as_tokens(x: np.ndarray) -> torch.Tensor:
    """(N, d) float64 -> (N, 1, d): the evaluate functions' feature layout, K = 1."""
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(-2)


def hand_dn_similarity(v, t, mu_v, mu_t, lam):
    """S_DN[i][j] = sum_k (v_ik - lam mu_v_k)(t_jk - lam mu_t_k), docs/METHODS.md section 4, by loops."""
    return np.array([[sum((v[i, k] - lam * mu_v[k]) * (t[j, k] - lam * mu_t[k]) for k in range(v.shape[1]))
                      for j in range(len(t))] for i in range(len(v))])


def hand_recall_at_1(sim) -> tuple[float, float]:
    """(i2t, t2i) R@1: the true partner must beat every other candidate (a tie counts against it)."""
    n = len(sim)
    i2t = sum(all(sim[i][j] < sim[i][i] for j in range(n) if j != i) for i in range(n)) / n
    t2i = sum(all(sim[i][j] < sim[j][j] for i in range(n) if i != j) for j in range(n)) / n
    return i2t, t2i


def retrieval_case():
    """Six pairs whose images and texts each carry a common offset of their own (seeded): R@1 here tells
    the DN formula apart from each mistake below."""
    rng = np.random.default_rng(0)
    offset_v, offset_t = rng.normal(size=3), rng.normal(size=3)
    image = nrm(rng.normal(size=(6, 3)) + 1.5 * offset_v)
    text = nrm(image + 0.6 * rng.normal(size=(6, 3)) + 1.5 * offset_t)
    return image, text, image.mean(0), text.mean(0)


def test_dn_retrieval_is_the_formula_on_normalised_features():
    """Retrieval: subtract lam * mu from the normalised features, no re-normalisation."""
    image, text, mu_v, mu_t = retrieval_case()
    expected = hand_recall_at_1(hand_dn_similarity(image, text, mu_v, mu_t, 0.5))
    mistakes = {
        "means swapped": hand_dn_similarity(image, text, mu_t, mu_v, 0.5),
        "re-normalised": hand_dn_similarity(nrm(image - 0.5 * mu_v), nrm(text - 0.5 * mu_t), 0 * mu_v, 0 * mu_t, 0.5),
        "mean added": hand_dn_similarity(image, text, -mu_v, -mu_t, 0.5),
        "text shift dropped": hand_dn_similarity(image, text, mu_v, 0 * mu_t, 0.5),
        "image shift dropped": hand_dn_similarity(image, text, 0 * mu_v, mu_t, 0.5),
        "lambda 0.25": hand_dn_similarity(image, text, mu_v, mu_t, 0.25),
        "lambda 1": hand_dn_similarity(image, text, mu_v, mu_t, 1.0),
        "dot product": image @ text.T,
    }
    for name, sim in mistakes.items():  # the case can tell each mistake from the formula
        assert hand_recall_at_1(sim) != expected, name
    means = (as_tokens(mu_v[None])[0], as_tokens(mu_t[None])[0])
    got = retrieval(as_tokens(image), as_tokens(text), means=means, ks=(1,))  # lambda's default is 0.5
    assert (got["i2t_R@1"], got["t2i_R@1"]) == pytest.approx(expected, abs=1e-6)
    got = retrieval(as_tokens(image), as_tokens(text), means=means, lam=1.0, ks=(1,))
    assert (got["i2t_R@1"], got["t2i_R@1"]) == pytest.approx(hand_recall_at_1(mistakes["lambda 1"]), abs=1e-6)


def hand_top1(image, classes, mu_v, mu_t, lam, renormalise=True) -> list[int]:
    """argmax_c <normalise(v - lam mu_v), normalise(c - lam mu_t)>, by loops."""
    def shift(x, mu):
        y = [x[k] - lam * mu[k] for k in range(len(x))]
        norm = sum(a * a for a in y) ** 0.5 if renormalise else 1.0
        return [a / norm for a in y]

    out = []
    for v in image:
        v = shift(v, mu_v)
        scores = [sum(a * b for a, b in zip(v, shift(c, mu_t))) for c in classes]
        out.append(max(range(len(classes)), key=scores.__getitem__))
    return out


def test_dn_zero_shot_subtracts_from_raw_features_then_normalises():
    """Zero-shot: normalise(v - lam mu_v) . normalise(c - lam mu_t). The case (seeded: 4 classes and the
    images with offsets of their own) is one where every mistake below changes at least one image's class."""
    rng = np.random.default_rng(3)
    offset_v, offset_t = rng.normal(size=3), rng.normal(size=3)
    classes = nrm(rng.normal(size=(4, 3)) + offset_t)
    image = nrm(classes[rng.integers(0, 4, 8)] + 0.5 * rng.normal(size=(8, 3)) + offset_v)
    mu_v, mu_t = image.mean(0), classes.mean(0)
    expected = hand_top1(image, classes, mu_v, mu_t, 0.5)
    zero = 0 * mu_v
    mistakes = {
        "means swapped": hand_top1(image, classes, mu_t, mu_v, 0.5),
        "no re-normalisation": hand_top1(image, classes, mu_v, mu_t, 0.5, renormalise=False),
        "text shift dropped": hand_top1(image, classes, mu_v, zero, 0.5),
        "image shift dropped": hand_top1(image, classes, zero, mu_t, 0.5),
        "mean added": hand_top1(image, classes, -mu_v, -mu_t, 0.5),
        "lambda 0.25": hand_top1(image, classes, mu_v, mu_t, 0.25),
        "lambda 1": hand_top1(image, classes, mu_v, mu_t, 1.0),
        "dot product": hand_top1(image, classes, zero, zero, 0.5),
    }
    for name, predicted in mistakes.items():
        assert predicted != expected, name
    means = (as_tokens(mu_v[None])[0], as_tokens(mu_t[None])[0])
    # labelled with the formula's own answers: top1 is 1 exactly when every image gets the formula's class
    labels = torch.tensor(expected)
    assert zero_shot(as_tokens(image), as_tokens(classes), labels, ks=(1,), means=means)["top1"] == 1.0
    for lam, name in ((1.0, "lambda 1"), (0.0, "dot product")):  # lambda is used as given; 0 is the dot product
        got = zero_shot(as_tokens(image), as_tokens(classes), labels, ks=(1,), means=means, lam=lam)["top1"]
        assert got == pytest.approx(np.mean(np.array(mistakes[name]) == labels.numpy()))
    dot = zero_shot(as_tokens(image), as_tokens(classes), labels, ks=(1,))["top1"]
    assert dot == pytest.approx(np.mean(np.array(mistakes["dot product"]) == labels.numpy()))


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
    # The dot-product numbers worked by hand from open_clip's own encoders: retrieval on every pair, zero-shot on
    # the one-object images with the world's prompts (DN's means are seeded draws here; the labelled test checks DN).
    from pipelines.worlds.shapes import VOCAB, ZERO_SHOT

    samples = list(wds.WebDataset(str(root / "world" / "test.tar"), shardshuffle=False))
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples]
    captions = [s["txt"].decode() for s in samples]
    metas = [json.loads(s["json"]) for s in samples]
    everything = hand_evaluation(root / "stock.pt", images, captions, ["thing"], [0] * len(images))
    got = stock["retrieval"]["dot"]
    assert (got["i2t_R@1"], got["t2i_R@1"]) == pytest.approx(everything["retrieval"]["dot"], abs=1e-6)
    one = [i for i, meta in enumerate(metas) if len(meta["objects"]) == 1]
    for task in ("colour", "shape"):
        classnames = list(VOCAB[task])
        labels = [classnames.index(metas[i]["objects"][0][task]) for i in one]
        hand = hand_evaluation(root / "stock.pt", [images[i] for i in one], [captions[i] for i in one], classnames, labels,
                               templates=ZERO_SHOT[task])
        assert stock["zero_shot"][task]["images"] == len(one) < len(samples)
        assert stock["zero_shot"][task]["dot"]["top1"] == pytest.approx(hand["zero_shot"]["dot"], abs=1e-6), task


def hand_evaluation(checkpoint, images: list, captions: list[str], classnames: list[str], labels: list[int], lam=0.5,
                    templates=None):
    """The evaluate stage's numbers for one checkpoint, worked in numpy from open_clip's own encoders: DN means
    from every sample (so no seeded draw is involved), zero-shot on the template-averaged class prompts."""
    import open_clip

    import train.models  # noqa: F401  (registers softcurate-tiny)
    from train.evaluate import TEMPLATES

    model, _, preprocess = open_clip.create_model_and_transforms("softcurate-tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("softcurate-tiny")
    model.eval()
    with torch.no_grad():
        v = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True).double().numpy()
        t = model.encode_text(tokenizer(captions), normalize=True).double().numpy()
        prompts = [model.encode_text(tokenizer([x.format(c) for x in templates or TEMPLATES]), normalize=True).double().numpy()
                   for c in classnames]
    classes = nrm(np.stack([p.mean(0) for p in prompts]))
    mu_v, mu_t = v.mean(0), t.mean(0)
    labels = np.asarray(labels)

    def top1(a, b):
        return float(np.mean((a @ b.T).argmax(1) == labels))

    return {"zero_shot": {"dot": top1(v, classes), "dn": top1(nrm(v - lam * mu_v), nrm(classes - lam * mu_t))},
            "retrieval": {"dot": hand_recall_at_1(v @ t.T), "dn": hand_recall_at_1(hand_dn_similarity(v, t, mu_v, mu_t, lam))}}


@pytest.mark.slow
def test_cli_on_a_labelled_webdataset_and_an_image_folder(setup, tmp_path):
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rng = np.random.default_rng(0)
    images, captions, labels = [], [], []
    with wds.TarWriter(str(tmp_path / "labelled.tar")) as sink:
        for i in range(20):
            name = list(colours)[i % 2]
            pixels = np.clip(np.asarray(colours[name]) + rng.normal(0, 60, (64, 64, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")  # lossless: the test sees the pixels the stage decodes
            captions.append(f"a {name} square number {i}")
            labels.append(i % 2)
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": captions[-1], "json": {"label": name}})
            folder = tmp_path / "folder" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(buf.getvalue())
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    labelled = evaluate("--root", str(tmp_path), "--checkpoints", str(setup / "stock.pt"), "--data", str(tmp_path / "labelled.tar"),
                        "--label-field", "label", "--classnames", str(tmp_path / "classes.txt"), "--dn-samples", "20",
                        "--dn-seeds", "2")
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "stock.json").read_text())
    expected = hand_evaluation(setup / "stock.pt", images, captions, ["red", "blue"], labels)
    zero = result["zero_shot"]["label"]
    assert zero["dot"]["top1"] == pytest.approx(expected["zero_shot"]["dot"], abs=1e-6)
    assert zero["dn"]["top1"] == pytest.approx(expected["zero_shot"]["dn"], abs=1e-6) and zero["dn_std"]["top1"] == 0.0
    for form in ("dot", "dn"):
        got = result["retrieval"][form]
        assert (got["i2t_R@1"], got["t2i_R@1"]) == pytest.approx(expected["retrieval"][form], abs=1e-6), form
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
    from pipelines.world_server import serve_world
    from pipelines.worlds.shapes import VOCAB

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
        f"softcurate evaluate: error: evaluate: label '{len(colours)}' of the label field bad is neither a class "
        f"index (0 to {len(colours) - 1}) nor one of the {len(colours)} class names"]
