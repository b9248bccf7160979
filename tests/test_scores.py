"""The score stage's math (curate.scores, curate.dn) against references written out by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curate.dn import dn_center, dn_means, normalise
from curate.scores import (
    auroc,
    clean_probability,
    cosine_score,
    detection_report,
    early_learning_end,
    estimated_noise,
    fit_mixture,
    key_ranks,
    pair_loss,
    pair_posterior,
    temperature_noise_indicator,
)
from train.losses import ClipLoss


def unit(rng, n, d):
    return normalise(rng.normal(size=(n, d)))


def test_posterior_is_the_softmax_over_positive_and_bank():
    rng = np.random.default_rng(0)
    v, t, bank_v, bank_t = unit(rng, 5, 8), unit(rng, 5, 8), unit(rng, 7, 8), unit(rng, 7, 8)
    log_i2t, log_t2i = pair_posterior(v, t, bank_v, bank_t, scale=10.0)
    for i in range(5):
        logits = torch.tensor(10.0 * np.concatenate([[v[i] @ t[i]], bank_t @ v[i]]))
        assert log_i2t[i] == pytest.approx(F.log_softmax(logits, 0)[0].item(), abs=1e-9)
        logits = torch.tensor(10.0 * np.concatenate([[t[i] @ v[i]], bank_v @ t[i]]))
        assert log_t2i[i] == pytest.approx(F.log_softmax(logits, 0)[0].item(), abs=1e-9)


def test_pair_loss_against_the_rest_of_the_batch_is_the_clip_loss():
    """With the other N-1 pairs as the bank, the mean per-pair loss is open_clip's ClipLoss on the batch."""
    rng = np.random.default_rng(1)
    v, t = unit(rng, 16, 8), unit(rng, 16, 8)
    self_in_bank = np.eye(16, dtype=bool)
    loss = pair_loss(*pair_posterior(v, t, v, t, 20.0, self_in_bank))
    clip = ClipLoss()(torch.tensor(v), torch.tensor(t), torch.tensor(20.0))["loss"].item()
    assert loss.mean() == pytest.approx(clip, rel=1e-9)


def test_the_pair_itself_in_the_bank_is_not_its_own_negative():
    rng = np.random.default_rng(2)
    v, t, bank_v, bank_t = unit(rng, 3, 8), unit(rng, 3, 8), unit(rng, 6, 8), unit(rng, 6, 8)
    with_self = np.concatenate([bank_v, v[:1]]), np.concatenate([bank_t, t[:1]])
    mask = np.zeros((3, 7), dtype=bool)
    mask[0, 6] = True
    expected = pair_posterior(v, t, bank_v, bank_t, 5.0)
    got = pair_posterior(v, t, *with_self, 5.0, mask)
    assert got[0][0] == pytest.approx(expected[0][0]) and got[1][0] == pytest.approx(expected[1][0])
    assert got[0][1] < expected[0][1]  # for the others, pair 0 is one more negative


def test_mixture_finds_the_two_components_and_clean_prob_is_monotone():
    rng = np.random.default_rng(3)
    losses = np.concatenate([rng.normal(2.0, 0.3, 7000), rng.normal(6.0, 1.0, 3000)])
    mixture = fit_mixture(losses, seed=0)
    assert mixture["means"][0] == pytest.approx(2.0, abs=0.05) and mixture["means"][1] == pytest.approx(6.0, abs=0.1)
    assert mixture["weights"][1] == pytest.approx(0.3, abs=0.02)
    grid = np.linspace(-5, 20, 2001)
    prob = clean_probability(mixture, grid)
    assert np.all(np.diff(prob) <= 1e-12), "a larger loss may never look cleaner"
    assert prob[0] > 0.99 and prob[-1] < 0.01
    assert 1 - clean_probability(mixture, losses).mean() == pytest.approx(0.3, abs=0.02)
    assert fit_mixture(losses, seed=0) == mixture  # seeded: the same fit twice


def test_mixture_refuses_too_few_pairs():
    with pytest.raises(ValueError, match="too few to fit the noise mixture"):
        fit_mixture(np.arange(10.0), seed=0)


def test_key_ranks_are_seeded_and_independent_of_order():
    keys = [f"{i:09d}" for i in range(1000)]
    ranks = dict(zip(keys, key_ranks(keys, 7)))
    shuffled = list(reversed(keys))
    assert all(ranks[k] == r for k, r in zip(shuffled, key_ranks(shuffled, 7)))
    smallest = {keys[i] for i in np.argsort(key_ranks(keys, 7))[:100]}
    other = {keys[i] for i in np.argsort(key_ranks(keys, 8))[:100]}
    assert len(smallest & other) < 30  # another seed, another sample


@pytest.mark.parametrize("eta", [0.05, 0.2, 0.5])
def test_temperature_indicator_inverts_the_equilibrium(eta):
    n, scale = 1024, 50.0
    delta = np.log((n - 1) * (1 - eta) / eta) / scale  # where training settles with noise rate eta
    positive, negative = np.full(10, 0.3 + delta), np.full(10, 0.3)
    assert temperature_noise_indicator(scale, positive, negative, n) == pytest.approx(eta, rel=1e-6)


def test_dn_centres_normalised_embeddings():
    rng = np.random.default_rng(4)
    image, text = rng.normal(size=(50, 6)) * 3, rng.normal(size=(50, 6)) + 2
    mu_v, mu_t = dn_means(image, text)
    assert np.allclose(mu_v, normalise(image).mean(0)) and np.allclose(mu_t, normalise(text).mean(0))
    assert np.allclose(dn_center(image, mu_v, 0.0), normalise(image))
    assert np.allclose(dn_center(image, mu_v, 1.0).mean(0), 0.0)


def test_cosine_and_auroc():
    rng = np.random.default_rng(5)
    v = unit(rng, 4, 3)
    assert np.allclose(cosine_score(v, v), 1.0)
    noisy = np.array([0, 0, 1, 1, 0, 1])
    assert auroc(noisy, [0.1, 0.2, 0.9, 0.8, 0.3, 0.7]) == 1.0
    assert auroc(noisy, [0.9, 0.8, 0.1, 0.2, 0.7, 0.3]) == 0.0


def test_detection_by_noise_kind_on_a_constructed_table():
    """Each kind against the clean pairs alone, counted by hand: AUROC = the share of (noisy, clean) pairs in which
    the noisy one scores noisier."""
    kinds = np.array(["clean", "clean", "clean", "clean", "swapped", "swapped", "unrelated", "unrelated"], dtype=object)
    noisy = kinds != "clean"
    loss = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 0.5, 3.5])
    clean_prob = np.array([0.9, 0.8, 0.4, 0.7, 0.1, 0.6, 0.3, 0.2])
    report = detection_report(noisy, kinds, {"clean_prob": clean_prob, "loss": loss, "cosine": -loss, "dn_score": loss})
    # loss: 5.0 beats all 4 clean, 2.5 beats 2 -> 6/8; 0.5 beats none, 3.5 beats 3 -> 3/8; all: 9/16
    assert report["by_kind"]["swapped"]["auroc"]["loss"] == 6 / 8
    assert report["by_kind"]["unrelated"]["auroc"]["loss"] == 3 / 8
    assert report["auroc"]["loss"] == 9 / 16
    assert report["by_kind"]["swapped"]["auroc"]["cosine"] == 6 / 8  # low cosine is noisy
    assert report["by_kind"]["swapped"]["auroc"]["dn_score"] == 2 / 8  # here high: the wrong way round
    # clean_prob: 0.1 is below all 4 clean, 0.6 below 3 -> 7/8; 0.3 and 0.2 are below all 4 -> 8/8
    assert report["by_kind"]["swapped"]["auroc"]["clean_prob"] == 7 / 8
    assert report["by_kind"]["unrelated"]["auroc"]["clean_prob"] == 1.0
    assert report["by_kind"]["swapped"]["pairs"] == 2 and report["by_kind"]["swapped"]["flagged"] == 0.5
    assert report["by_kind"]["unrelated"]["flagged"] == 1.0
    assert report["clean_flagged"] == 0.25  # 0.4 of the four clean pairs
    assert report["noise_rate"] == {"estimated": pytest.approx(1 - 4.0 / 8), "labelled": 0.5}
    assert (report["pairs"], report["noisy"]) == (8, 4)
    assert "by_kind" not in detection_report(noisy, None, {"clean_prob": clean_prob, "loss": loss})


def test_early_learning_ends_where_the_mixture_finds_the_most_noise():
    epochs, noise = [4, 1, 2, 3], [0.45, 0.41, 0.53, 0.48]  # best.pt (epoch 4) listed first, as the score stage does
    assert early_learning_end(epochs, noise) == 2
    assert early_learning_end([3, 1, 2], [0.5, 0.5, 0.4]) == 1  # a tie: the earlier epoch
    assert early_learning_end([1], [0.2]) == 1
    rng = np.random.default_rng(0)  # a clear two-component loss finds about its noisy share
    losses = np.concatenate([rng.normal(1.0, 0.2, 700), rng.normal(3.0, 0.3, 300)])
    assert estimated_noise(losses, 0) == pytest.approx(0.3, abs=0.03)


def test_the_loss_is_averaged_over_the_chosen_checkpoints_only():
    """loss_span: every checkpoint, but under the early rule the epochs up to the noisiest one; their mean is the
    loss the mixture is fitted on (global_state) and the one each score task writes (score_shard)."""
    from pipelines.score import loss_span

    rng = np.random.default_rng(1)
    clean, noisy = rng.normal(1.0, 0.2, 700), rng.normal(3.0, 0.3, 300)
    memorised = np.concatenate([clean, noisy - 1.5])  # the noisy pairs' loss drops into the clean one's range
    learning = np.concatenate([clean, noisy])
    half_learnt = np.concatenate([clean, noisy[:150], noisy[150:] - 2.0])
    losses = [memorised, half_learnt, learning]  # best.pt (epoch 3), epochs 1, 2: noise found 0.26, 0.15, 0.30
    averaged, noise = loss_span({"loss_rule": "early", "epochs": [3, 1, 2]}, losses, 0)
    assert averaged == [1, 2] and max(noise, key=noise.get) == 2 and list(noise) == [1, 2, 3]
    assert loss_span({"loss_rule": "up_to_best", "epochs": [3, 1, 2]}, losses, 0) == ([0, 1, 2], None)
    assert loss_span({"loss_rule": "given", "epochs": None}, losses[:2], 0) == ([0, 1], None)


def jpeg(size, seed=0) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_fast_decode_gives_the_transforms_tensor_bitwise():
    import train.models  # noqa: F401  (registers softcurate-tiny)
    from curate.teacher import fast_path, prepare, stack_images

    model, _, preprocess = __import__("open_clip").create_model_and_transforms("softcurate-tiny")
    fast = fast_path(model)
    samples = [{"jpg": jpeg((64, 64), i), "txt": b"a red circle"} for i in range(3)] + [{"jpg": jpeg((80, 50)), "txt": b"x"}]
    fast_batch = stack_images([prepare(s, preprocess, fast)[0] for s in samples], fast)
    slow_batch = stack_images([prepare(s, preprocess, None)[0] for s in samples], None)
    assert fast_batch.shape == (4, 3, 64, 64) and torch.equal(fast_batch, slow_batch)


@pytest.mark.parametrize("sample, reason", [
    ({"txt": b"a cat"}, "no image in the sample"),
    ({"jpg": b"x"}, "no caption in the sample"),
    ({"jpg": b"x", "txt": b"\xff\xfe caption"}, "caption is not UTF-8"),
    ({"jpg": b"x", "txt": b"  \n"}, "empty caption"),
    ({"jpg": b"GIF89a broken", "txt": b"a cat"}, "image decoding error: UnidentifiedImageError"),
])
def test_bad_samples_name_their_reason(sample, reason):
    from curate.teacher import BadSample, prepare

    with pytest.raises(BadSample) as err:
        prepare(sample, lambda image: image)
    assert str(err.value) == reason


# ---------------------------------------------------------------- the score task against a hand computation
def fixed_list(values: np.ndarray | None, n: int, dim: int):
    """float16 fixed-size lists, null rows where `values` has NaN: the _embed files' layout."""
    import pyarrow as pa

    mask = np.isnan(values[:, 0])
    flat = pa.array(np.nan_to_num(values).astype(np.float16).ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(mask))


def hand_log_posterior(x, y, bank_y, scale, skip):
    """log p of the true partner by explicit sums: exp(s<x,y>) / (exp(s<x,y>) + sum_j exp(s<x,b_j>)),
    bank entries in `skip` (the pair itself) left out."""
    positive = math.exp(scale * float(x @ y))
    negatives = sum(math.exp(scale * float(x @ b)) for j, b in enumerate(bank_y) if j not in skip)
    return math.log(positive / (positive + negatives))


def test_score_shard_columns_against_a_hand_computation(tmp_path):
    """score_shard on a tiny embedding file and a hand-made state (two teacher checkpoints, a bank holding one of
    the shard's own pairs, one failed sample): cosine, DN score, posterior at each teacher's scale, mean loss and
    the clean probability, every column recomputed from docs/METHODS.md sections 3-4."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.score_tasks import score_shard

    rng = np.random.default_rng(7)
    n, d, lam = 6, 4, 0.5
    keys = [f"{i:04d}" for i in range(n)]
    failed = 2
    emb = {}
    for name in ("image_emb_0", "text_emb_0", "image_emb_1", "text_emb_1"):
        raw = (rng.normal(size=(n, d)) + 0.8).astype(np.float16).astype(np.float64)  # a shared offset: DN matters
        raw[failed] = np.nan
        emb[name] = raw
    pq.write_table(pa.table({
        "key": pa.array(keys, pa.string()), "row": pa.array(range(n), pa.int64()),
        "status": pa.array(["failed" if i == failed else "scored" for i in range(n)], pa.string()),
        "error": pa.array(["empty caption" if i == failed else None for i in range(n)], pa.string()),
        **{name: fixed_list(values, n, d) for name, values in emb.items()}}), tmp_path / "embed.parquet")
    bank_keys = ["0004", "9000", "9001", "9002"]  # 0004 is a pair of this shard: not its own negative
    checkpoints = [{"scale": scale, "mu_v": rng.normal(size=d) * 0.3 + 0.4, "mu_t": rng.normal(size=d) * 0.3 + 0.4,
                    "bank_v": rng.normal(size=(4, d)) * 0.5, "bank_t": rng.normal(size=(4, d)) * 0.5}
                   for scale in (14.0, 3.0)]  # two teachers with their own learned scales
    mixture = {"weights": [0.7, 0.3], "means": [1.0, 2.5], "variances": [0.4, 0.4]}  # equal variances: monotone
    state = {"bank_keys": bank_keys, "lambda": lam, "checkpoints": checkpoints, "mixture": mixture, "k": 0,
             "averaged": [0, 1], "teacher": {"loss_rule": "given"}}
    score_shard(str(tmp_path / "embed.parquet"), str(tmp_path / "scores.parquet"), state, {"method": "none"}, 1)
    out = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    score_shard(str(tmp_path / "embed.parquet"), str(tmp_path / "second.parquet"), {**state, "averaged": [1]},
                {"method": "none"}, 1)
    second_only = pq.read_table(tmp_path / "second.parquet").to_pydict()
    assert out["key"] == keys and out["status"][failed] == "failed"

    def unit(x):
        return x / math.sqrt(float(x @ x))

    for i in range(n):
        if i == failed:
            assert all(out[c][i] is None for c in ("cosine", "dn_score", "p_i2t", "p_t2i", "loss", "clean_prob",
                                                   "loss_by_checkpoint"))
            continue
        skip = {j for j, k in enumerate(bank_keys) if k == keys[i]}
        losses, posteriors = [], []
        for j, ck in enumerate(checkpoints):
            v = unit(emb[f"image_emb_{j}"][i]) - lam * ck["mu_v"]  # retrieval-form DN: centred after normalising
            t = unit(emb[f"text_emb_{j}"][i]) - lam * ck["mu_t"]
            log_i2t = hand_log_posterior(v, t, ck["bank_t"], ck["scale"], skip)
            log_t2i = hand_log_posterior(t, v, ck["bank_v"], ck["scale"], skip)
            posteriors.append((math.exp(log_i2t), math.exp(log_t2i)))
            losses.append(-(log_i2t + log_t2i) / 2)
        loss = sum(losses) / len(losses)
        v0, t0 = unit(emb["image_emb_0"][i]), unit(emb["text_emb_0"][i])
        ck0 = checkpoints[0]
        w, mu, var = mixture["weights"], mixture["means"], mixture["variances"]
        density = [w[c] / math.sqrt(2 * math.pi * var[c]) * math.exp(-(loss - mu[c]) ** 2 / (2 * var[c])) for c in (0, 1)]
        expected = {"cosine": float(v0 @ t0), "dn_score": float((v0 - lam * ck0["mu_v"]) @ (t0 - lam * ck0["mu_t"])),
                    "p_i2t": posteriors[0][0], "p_t2i": posteriors[0][1], "loss": loss,
                    "clean_prob": density[0] / (density[0] + density[1])}
        for name, value in expected.items():
            assert out[name][i] == pytest.approx(value, rel=2e-6, abs=1e-6), (name, i)
        assert out["loss_by_checkpoint"][i] == pytest.approx(losses, rel=2e-6)  # each teacher's, in the listed order
        assert second_only["loss"][i] == pytest.approx(losses[1], rel=2e-6)  # averaged over the second alone
        assert second_only["cosine"][i] == out["cosine"][i]  # the embeddings still come from the first


def test_the_teachers_learned_scale_is_exp_of_its_logit_scale():
    """The posterior's s is exp(logit_scale) of the teacher (open_clip stores log s)."""
    import train.models  # noqa: F401  (registers softcurate-tiny)
    from curate.teacher import logit_scale

    model = __import__("open_clip").create_model("softcurate-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    assert logit_scale(model) == pytest.approx(20.0, rel=1e-6)


def test_the_own_teachers_loss_epochs_follow_the_rule(tmp_path, capsys):
    """best.pt first (the embeddings), then the epochs the rule adds to the loss average; best.pt alone without them."""
    import json

    from pipelines.config import load_config
    from pipelines.score import own_teacher
    from pipelines.train import resolve

    folder = tmp_path / "runs" / "teacher" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("best.pt", *(f"epoch_{e:03d}.pt" for e in range(1, 7))):
        (folder / name).write_bytes(b"")
    (folder.parent / "_summary.json").write_text(json.dumps({"best_epoch": 4}))

    def chosen(*overrides):
        config = load_config(None, [f"root={tmp_path}", "train.name=teacher", *overrides])
        paths, rule, epochs = own_teacher(config)
        return [p.rsplit("/", 1)[1] for p in paths], rule, epochs

    up_to_4 = ["best.pt", "epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]  # best.pt is epoch 4
    assert chosen() == (up_to_4, "early", [4, 1, 2, 3])  # the early rule picks among these from their losses
    assert chosen("score.teacher_epochs=up_to_best") == (up_to_4, "up_to_best", [4, 1, 2, 3])
    assert chosen("score.teacher_epochs=all") == (up_to_4 + ["epoch_005.pt", "epoch_006.pt"], "all", [4, 1, 2, 3, 5, 6])
    assert chosen("score.teacher_epochs=best") == (["best.pt"], "best", None)
    (folder.parent / "_summary.json").write_text(json.dumps({"best_epoch": 1}))
    assert chosen() == (["best.pt"], "early", [1])  # the best epoch is the first: nothing before it
    (folder.parent / "_summary.json").write_text(json.dumps({"best_epoch": None}))  # a run with no validation split
    assert chosen() == (["best.pt"], "best", None) and "best.pt alone" in capsys.readouterr().out
    # the train stage keeps the epoch checkpoints exactly when this config's score stage will average them
    settings = ["train.shards=x.tar", f"root={tmp_path}"]
    assert resolve(load_config(None, settings)).train.epoch_checkpoints is True
    for override in ("score.teacher_epochs=best", "score.checkpoints=[b.pt]", "train.epoch_checkpoints=false"):
        assert resolve(load_config(None, [*settings, override])).train.epoch_checkpoints is False, override


def test_folds_come_from_the_key_alone_and_the_held_out_loss_from_the_other_folds_teacher():
    from curate.scores import folds_of, held_out_loss

    keys = [f"{i:09d}" for i in range(3000)]
    folds = folds_of(keys, 0, 3)
    assert np.bincount(folds).min() > 900  # three folds of about a third
    assert (folds_of(keys[::-1], 0, 3) == folds[::-1]).all()  # independent of order
    assert (folds_of(keys, 1, 3) != folds).mean() > 0.5  # the seed redraws them
    losses = [np.full(3000, -1.0)] + [np.full(3000, float(k)) for k in range(3)]  # the whole teacher, then fold k's
    assert (held_out_loss(losses, keys, 0) == folds).all()
