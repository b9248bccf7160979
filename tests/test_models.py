import logging

import open_clip
import pytest
import torch

from train.models import create_model, pick_device, save_checkpoint


def test_tiny_model_checkpoint_loads_in_plain_open_clip(tmp_path):
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("softcurate-tiny")
    model.eval()
    path = tmp_path / "ckpt" / "tiny.pt"
    save_checkpoint(model, path)
    assert not path.with_suffix(".pt.tmp").exists()

    again, _, preprocess2 = open_clip.create_model_and_transforms("softcurate-tiny", pretrained=str(path))
    again.eval()
    images = torch.rand(3, 3, 64, 64)
    text = tokenizer(["a red circle on the left", "a blue square", "click to enlarge"])
    assert text.shape == (3, 32)
    with torch.no_grad():
        a_img, a_txt, a_scale = model(images, text)
        b_img, b_txt, b_scale = again(images, text)
    torch.testing.assert_close(a_img, b_img)
    torch.testing.assert_close(a_txt, b_txt)
    assert a_img.shape == (3, 64) and torch.allclose(a_img.norm(dim=-1), torch.ones(3))
    # A fresh model with another seed differs, so the equality above is the checkpoint's doing.
    torch.manual_seed(1)
    other, *_ = create_model("softcurate-tiny")
    with torch.no_grad():
        assert not torch.allclose(other.eval()(images, text)[0], a_img)


def test_only_the_random_init_notice_of_a_fresh_model_is_silenced(caplog):
    with caplog.at_level(logging.WARNING):
        open_clip.create_model_and_transforms("softcurate-tiny")  # open_clip itself says so
        assert any("initialized randomly" in m for m in caplog.messages)
        caplog.clear()
        create_model("softcurate-tiny")  # no pretrained: a random start is what we asked for
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # outside the call
        logging.warning("another warning")
    assert caplog.messages == ["No pretrained weights loaded for model 'x'. Model initialized randomly.", "another warning"]


def test_bad_model_and_checkpoint_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        create_model("ViT-Nope")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("softcurate-tiny", pretrained=str(tmp_path / "missing.pt"))
    # A checkpoint of another architecture: open_clip refuses it with the mismatching keys named.
    small, *_ = create_model("softcurate-tiny")
    state = {k: v for k, v in small.state_dict().items() if not k.startswith("visual.")}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt does not fit model softcurate-tiny"):
        create_model("softcurate-tiny", pretrained=str(tmp_path / "partial.pt"))


def test_device_selection():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_retrieval_recall_by_hand():
    from train.evaluate import retrieval_recall

    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])  # pairs 1 and 2 swapped
    recall = retrieval_recall(image, text, ks=(1, 2))
    assert recall == pytest.approx({"i2t_R@1": 1 / 3, "i2t_R@2": 1 / 3, "t2i_R@1": 1 / 3, "t2i_R@2": 1 / 3})
    tied = retrieval_recall(torch.ones(2, 1), torch.ones(2, 1), ks=(1,))
    assert tied["i2t_R@1"] == 0.0  # ties do not count as found
