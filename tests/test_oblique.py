import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from train.losses import ObliqueLoss
from train.models import create_model, save_checkpoint
from train.oblique import _to_oblique, load_oblique, make_oblique, oblique_similarity, save_oblique

NAME = "softcurate-tiny"  # embed_dim 64, ViT 64px patch 8 (64 patches), text context 32
RN = "softcurate-rn-tiny"  # embed_dim 64, ModifiedResNet 64px (a 2x2 grid into its attention pool), the same text tower
SOT, EOT = 49406, 49407


def tiny(seed: int = 0, name: str = NAME):
    torch.manual_seed(seed)
    model, _, _, tokenizer = create_model(name)
    return model.eval(), tokenizer


def random_tokens(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """CLIP-tokenizer-shaped random captions: SOT, words, EOT at a random place, zero padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = int(torch.randint(2, length, (1,), generator=g))
        text[i, 0], text[i, end] = SOT, EOT
        text[i, 1:end] = torch.randint(1, SOT, (end - 1,), generator=g)
    return text


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [NAME, RN])
def test_k1_is_stock_open_clip(name):
    stock, tokenizer = tiny(name=name)
    reference = copy.deepcopy(stock)
    text = torch.cat([random_tokens(4), tokenizer(["a red circle on the left", "click to enlarge"])])
    with torch.no_grad():
        want_img, want_txt, want_scale = reference(images(6), text)

    # make_oblique(K=1) is the identity: same object, same parameters, same outputs.
    same = make_oblique(stock, 1)
    assert same is stock and same.oblique_k == 1 and type(same) is open_clip.CLIP
    for (n_a, a), (n_b, b) in zip(same.state_dict().items(), reference.state_dict().items()):
        assert n_a == n_b and torch.equal(a, b)

    # The general conversion path forced to K=1 adds only empty tensors and computes the same thing.
    forced = _to_oblique(copy.deepcopy(reference), 1)
    extra = set(forced.state_dict()) - set(reference.state_dict())
    assert all(forced.state_dict()[n].numel() == 0 for n in extra)
    for n, p in reference.state_dict().items():
        assert torch.equal(forced.state_dict()[n], p)
    with torch.no_grad():
        img, txt, scale = forced(images(6), text)
    assert img.shape == (6, 1, 64) and txt.shape == (6, 1, 64)
    torch.testing.assert_close(img.reshape(6, 64), want_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt.reshape(6, 64), want_txt, atol=1e-6, rtol=0)
    assert scale == want_scale
    # Stock (N, D) features are K = 1 for the oblique similarity.
    torch.testing.assert_close(oblique_similarity(want_img, want_txt), want_img @ want_txt.T)


def test_k4_shapes_norms_and_similarity():
    model, _ = tiny()
    stock = copy.deepcopy(model)
    make_oblique(model, 4)
    assert model.oblique_k == 4 and model.visual.proj.shape == (64, 16) and model.text_projection.shape == (64, 16)
    assert isinstance(model, open_clip.CLIP)
    text = random_tokens(5)
    with torch.no_grad():
        img, txt, scale = model(images(5), text)
        raw_txt = model.encode_text(text)
        stock_txt = stock.encode_text(text)
    assert img.shape == (5, 4, 16) and txt.shape == (5, 4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5, 4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5, 4))
    torch.testing.assert_close(scale, stock.logit_scale.exp())

    sim = oblique_similarity(img, txt)
    assert sim.shape == (5, 5)
    torch.testing.assert_close(sim, img.reshape(5, 64) @ txt.reshape(5, 64).T)
    by_hand = sum(img[:, k] @ txt[:, k].T for k in range(4))
    torch.testing.assert_close(sim, by_hand)
    assert sim.abs().max() <= 4 + 1e-5
    torch.testing.assert_close(oblique_similarity(img, img).diagonal(), torch.full((5,), 4.0))  # the bound is reached
    with pytest.raises(ValueError, match="equal K"):
        oblique_similarity(img, txt[:, :2])

    # Caption tokens never see the appended class tokens, so text token 0 is stock CLIP's EOT feature
    # through the first D/K columns of the stock projection.
    torch.testing.assert_close(raw_txt[:, 0], stock_txt[:, :16], atol=1e-5, rtol=1e-5)


def test_every_token_sees_the_whole_input():
    model, tokenizer = tiny()
    make_oblique(model, 4)
    text = tokenizer(["a red circle on the left", "a red circle on the right"])
    with torch.no_grad():
        a, b = model.encode_text(text, normalize=True)
    assert ((a - b).norm(dim=-1) > 1e-4).all(), "changing the last word must change all K text tokens"

    # What follows the caption's end (EOT) is not seen: the class tokens ignore the padding.
    text = random_tokens(3)
    garbage = text.clone()
    for i, end in enumerate(text.argmax(dim=-1)):
        garbage[i, end + 1:] = torch.randint(1, SOT, (32 - end - 1,))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text), model.encode_text(garbage), atol=1e-6, rtol=0)

    image = images(1)
    changed = image.clone()
    changed[:, :, -8:, -8:] = torch.rand(1, 3, 8, 8)  # the last patch only
    with torch.no_grad():
        a, b = model.encode_image(torch.cat([image, changed]), normalize=True)
    assert ((a - b).norm(dim=-1) > 1e-4).all(), "changing one patch must change all K image tokens"


def test_patch_dropout_keeps_all_class_tokens():
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, force_patch_dropout=0.5)
    make_oblique(model, 4)
    visual = model.visual.train()
    x = visual._embeds(images(2))
    assert x.shape == (2, 4 + 32, 64)  # K class tokens + half of the 64 patches
    extra = visual.ln_pre(visual.extra_class_embedding + visual.extra_positional_embedding)
    torch.testing.assert_close(x[:, 1:4], extra.expand(2, -1, -1))
    assert model(images(2), random_tokens(2))[0].shape == (2, 4, 16)


def symmetric_ce(model, image, text) -> torch.Tensor:
    img, txt, _ = model(image, text)
    logits = 10 * oblique_similarity(img, txt)
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_gradients_reach_new_tokens_and_training_reduces_loss():
    model, _ = tiny()
    make_oblique(model, 4)
    model.train()
    image, text = images(8), random_tokens(8)
    symmetric_ce(model, image, text).backward()
    for name in ("visual.extra_class_embedding", "visual.extra_positional_embedding", "text_extra_class_embedding",
                 "visual.class_embedding", "visual.proj", "text_projection"):
        grad = model.get_parameter(name).grad
        assert grad is not None and (grad.reshape(grad.shape[0], -1).abs().sum(-1) > 0).all(), name
    assert {"visual.extra_class_embedding", "text_extra_class_embedding"} <= model.no_weight_decay()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = symmetric_ce(model, image, text)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_resnet_k16_queries_share_the_stock_keys_and_train():
    """ModifiedResNet: K queries (stock's, the spatial mean at row 0, and K-1 learned ones) over the stock
    keys, through one c_proj narrowed to D/K."""
    model, _ = tiny(name=RN)
    stock = copy.deepcopy(model)
    make_oblique(model, 16)
    pool = model.visual.attnpool
    assert pool.extra_query_embedding.shape == (15, 512) and pool.c_proj.weight.shape == (4, 512)
    assert model.visual.output_dim == 4
    assert {"visual.attnpool.extra_query_embedding", "text_extra_class_embedding"} <= model.no_weight_decay()
    image, text = images(5), random_tokens(5)
    with torch.no_grad():
        img, txt, _ = model(image, text)
        raw, want = model.encode_image(image), stock.encode_image(image)
    assert img.shape == (5, 16, 4) and txt.shape == (5, 16, 4)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5, 16))
    # The new queries are not keys: token 0 is stock's pooled feature through c_proj's first D/K columns.
    torch.testing.assert_close(raw[:, 0], want[:, :4], atol=1e-6, rtol=1e-5)
    # ...and each new query is one of its own: moving query j moves token j + 1 only.
    with torch.no_grad():
        pool.extra_query_embedding[3] += 1.0
        moved = model.encode_image(image)
    changed = (moved - raw).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [i == 4 for i in range(16)], changed
    # With attention as sharp as after training (here: features scaled up), the learned queries attend
    # apart and the tokens differ; queries that carried the image's mean would attend alike (cosine ~1).
    features = 300 * torch.randn(5, 512, 2, 2, generator=torch.Generator().manual_seed(0)) / 512 ** 0.5
    with torch.no_grad():
        pooled = F.normalize(pool(features), dim=-1)
    cosine = (pooled @ pooled.transpose(1, 2))[:, ~torch.eye(16, dtype=torch.bool)].mean()
    assert cosine < 0.9, cosine

    model.train()
    loss_fn = ObliqueLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    image, text, losses = images(8), random_tokens(8), []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(*model(image, text)[:2], 1.0)["loss"]
        loss.backward()
        grad = pool.extra_query_embedding.grad
        assert (grad.abs().sum(-1) > 0).all(), "every new query row must get a gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", [NAME, RN])
def test_checkpoint_round_trip_and_clear_errors(tmp_path, name):
    model, tokenizer = tiny(name=name)
    make_oblique(model, 4)
    path = tmp_path / "runs" / "oblique.pt"
    save_oblique(model, path, model_name=name)
    assert not path.with_suffix(".pt.tmp").exists()

    again, _, preprocess, tokenizer2 = load_oblique(name, path, 4)
    assert again.oblique_k == 4 and tokenizer2(["x"]).shape == (1, 32) and callable(preprocess)
    image, text = images(3), tokenizer(["a red circle", "a blue square", "click to enlarge"])
    with torch.no_grad():
        for a, b in zip(model(image, text), again.eval()(image, text)):
            torch.testing.assert_close(a, b)

    with pytest.raises(ValueError, match="checkpoint has K=4, asked for K=2"):
        load_oblique(name, path, 2)
    with pytest.raises(ValueError, match="checkpoint has K=4, asked for K=1"):
        load_oblique(name, path, 1)
    with pytest.raises(ValueError, match=f"is a '{name}' model, asked for 'ViT-B-32'"):
        load_oblique("ViT-B-32", path, 4)
    with pytest.raises(FileNotFoundError):
        load_oblique(name, tmp_path / "missing.pt", 4)
    # Stock open_clip refuses the oblique checkpoint, naming the oblique keys.
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*visual\.(attnpool\.)?extra_"):
        open_clip.create_model_and_transforms(name, pretrained=str(path))
    # ...and our loader refuses a stock checkpoint, saying where it does load.
    stock, _ = tiny(name=name)
    save_checkpoint(stock, tmp_path / "stock.pt")
    with pytest.raises(ValueError, match="not an oblique checkpoint.*create_model"):
        load_oblique(name, tmp_path / "stock.pt", 4)

    # A bare state dict of an oblique model (train.models.save_checkpoint) still knows its K.
    save_checkpoint(model, tmp_path / "bare.pt")
    bare, *_ = load_oblique(name, tmp_path / "bare.pt", 4)
    for key, tensor in model.state_dict().items():
        assert torch.equal(bare.state_dict()[key], tensor), key
    with pytest.raises(ValueError, match="checkpoint has K=4, asked for K=8"):
        load_oblique(name, tmp_path / "bare.pt", 8)

    # K = 1 checkpoints are stock open_clip state dicts inside the same wrapper.
    save_oblique(stock, tmp_path / "k1.pt")
    k1, *_ = load_oblique(name, tmp_path / "k1.pt", 1)
    with torch.no_grad():
        torch.testing.assert_close(k1.eval().encode_text(text), stock.encode_text(text))


def test_unsupported_conversions_fail_clearly():
    model, _ = tiny()
    with pytest.raises(ValueError, match="not divisible by K=5"):
        make_oblique(model, 5)
    with pytest.raises(ValueError, match="positive integer"):
        make_oblique(model, 0)
    make_oblique(model, 2)
    with pytest.raises(ValueError, match="already oblique with K=2"):
        make_oblique(model, 4)
    with pytest.raises(ValueError, match="topology must be one of oblique, sphere"):
        make_oblique(tiny()[0], 4, "torus")
    other = tiny()[0]
    other.visual.pool_type = "avg"  # no class token to be token 0
    with pytest.raises(ValueError, match="class-token pooling .* or its ModifiedResNet, got VisionTransformer"):
        make_oblique(other, 4)


@pytest.mark.parametrize("name", [NAME, RN])
def test_sphere_topology_normalises_the_k_tokens_once_and_is_kept_by_checkpoints(tmp_path, name):
    """The matched control: the same K-token towers, their concatenation normalised once. Every consumer
    (the loss, validation, evaluation) then compares (N, D) unit vectors, as the loss trained them."""
    from pipelines.evaluate import load
    from train.evaluate import encode
    from train.losses import ClipLoss, ObliqueLoss

    oblique, tokenizer = tiny(name=name)
    make_oblique(oblique, 4)
    sphere = copy.deepcopy(oblique)
    sphere.oblique_topology = "sphere"  # the same weights, the other topology
    image, text = images(5), random_tokens(5)
    with torch.no_grad():
        tokens_img, tokens_txt = oblique.encode_image(image), oblique.encode_text(text)
        img, txt, scale = sphere(image, text)
    assert img.shape == (5, 64) and txt.shape == (5, 64)
    torch.testing.assert_close(img, F.normalize(tokens_img.flatten(1), dim=-1))
    torch.testing.assert_close(txt, F.normalize(tokens_txt.flatten(1), dim=-1))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    # the sphere loss on the sphere model's features is CLIP on them; on the oblique model's per-token
    # normalised tokens it is not (normalising twice is not normalising once): the model must carry its topology
    clip = ClipLoss()(img, txt, scale)["loss"]
    torch.testing.assert_close(ObliqueLoss(topology="sphere")(img, txt, scale)["loss"], clip)
    with torch.no_grad():
        per_token = oblique(image, text)
    assert abs(ObliqueLoss(topology="sphere")(*per_token[:2], scale)["loss"] - clip) > 1e-4

    save_oblique(sphere, tmp_path / "sphere.pt", model_name=name)
    assert torch.load(tmp_path / "sphere.pt", weights_only=True)["topology"] == "sphere"
    again, *_ = load_oblique(name, tmp_path / "sphere.pt", 4)
    assert again.oblique_topology == "sphere"
    # the evaluate stage's loader and encoder: one D-dim unit vector per sample (K = 1 to its scoring)
    evaluated, _, _ = load(name, str(tmp_path / "sphere.pt"), "cpu")
    features = encode(evaluated, images=image)
    assert features.shape == (5, 1, 64)
    torch.testing.assert_close(features[:, 0], img, atol=1e-6, rtol=1e-5)
    # a checkpoint that records no topology is an oblique one
    payload = torch.load(tmp_path / "sphere.pt", weights_only=True)
    del payload["topology"]
    torch.save(payload, tmp_path / "old.pt")
    old, *_ = load_oblique(name, tmp_path / "old.pt", 4)
    assert old.oblique_topology == "oblique"
    with torch.no_grad():
        assert old.eval().encode_image(image, normalize=True).shape == (5, 4, 16)
