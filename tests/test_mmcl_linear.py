"""bench/mmcl_linear.py, the linear experiment of Nakada et al.: the data generator, the sin-theta
distance, the closed form, and a short run end to end."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("mmcl_linear", Path(__file__).resolve().parents[1] / "bench" / "mmcl_linear.py")
mmcl_linear = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mmcl_linear)


def test_data_shapes_and_orthonormal_subspaces():
    data = mmcl_linear.make_data(0, n_pairs=30, n_pool=70, n_test=50)
    d1, d2, r = mmcl_linear.D1, mmcl_linear.D2, mmcl_linear.R
    for u, d in ((data["u1"], d1), (data["u2"], d2)):
        assert u.shape == (d, r)
        assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-5)
    assert data["x"].shape == (30, d1) and data["y"].shape == (30, d2)
    assert data["test_x"].shape == (50, d1) and data["test_y"].shape == (50, d2)
    assert data["pool_x"].shape == (70, d1) and data["pool_y"].shape == (70, d2)
    # a seed fixes everything, another changes it
    assert torch.equal(mmcl_linear.make_data(0, n_pairs=30, n_pool=70, n_test=50)["x"], data["x"])
    assert not torch.equal(mmcl_linear.make_data(1, n_pairs=30, n_pool=70, n_test=50)["u1"], data["u1"])


def corr(data, x, y):
    """Correlation of images and texts projected on the true subspaces: high when row i's share a latent."""
    a, b = x @ data["u1"], y @ data["u2"]
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def test_pool_is_unpaired_and_pairs_are_paired():
    # a pair shares its latent; the independent pool's i-th image and text do not; the hidden pool's do
    data = mmcl_linear.make_data(0, n_pairs=2000, n_pool=2000, n_test=10)
    assert corr(data, data["x"], data["y"]) > 0.8
    assert abs(corr(data, data["pool_x"], data["pool_y"])) < 0.1
    hidden = mmcl_linear.make_data(0, n_pairs=2000, n_pool=2000, n_test=10, pool="hidden")
    assert corr(hidden, hidden["pool_x"], hidden["pool_y"]) > 0.8


def test_pool_batches():
    # hidden: each batch holds its images' partners, shuffled (no position gives the pairing away);
    # independent: the text batches are unrelated to the image batches; both cover every index once
    g = torch.Generator().manual_seed(0)
    for pool in ("hidden", "independent"):
        batches = mmcl_linear.pool_batches(200, pool, g, batch=50)
        assert sorted(torch.cat([i for i, _ in batches]).tolist()) == list(range(200))
        assert sorted(torch.cat([j for _, j in batches]).tolist()) == list(range(200))
        same_set = [set(i.tolist()) == set(j.tolist()) for i, j in batches]
        in_place = sum((i == j).sum().item() for i, j in batches)
        if pool == "hidden":
            assert all(same_set) and in_place < 20
        else:
            assert not any(same_set)


def test_sin_theta_extremes():
    g = torch.Generator().manual_seed(0)
    u = mmcl_linear.haar(40, 10, g)
    assert mmcl_linear.sin_theta(u.T, u) < 1e-6
    assert mmcl_linear.sin_theta(3.0 * torch.randn(10, 10, generator=g) @ u.T, u) < 1e-5  # row space, not the rows
    complement = torch.randn(40, 10, generator=g)
    complement = complement - u @ (u.T @ complement)  # orthogonal to every column of u
    assert abs(mmcl_linear.sin_theta(complement.T, u) - math.sqrt(10)) < 1e-5


def test_closed_form_recovers_the_subspaces():
    data = mmcl_linear.make_data(0, n_pairs=2000, n_pool=10, n_test=1000)
    g1, g2 = mmcl_linear.closed_form(data["x"], data["y"])
    assert g1.shape == (mmcl_linear.R, mmcl_linear.D1) and g2.shape == (mmcl_linear.R, mmcl_linear.D2)
    result = mmcl_linear.evaluate(g1, g2, data)
    assert result["sin_theta"] < 0.5
    assert result["top1"] > 0.5  # chance is 0.001
    # a random pair of encoders is far from both
    g = torch.Generator().manual_seed(1)
    noise = mmcl_linear.evaluate(torch.randn(10, 40, generator=g), torch.randn(10, 39, generator=g), data)
    assert noise["sin_theta"] > 2.0 and noise["top1"] < 0.05


def test_top1_known_answer():
    v = torch.eye(4)
    assert mmcl_linear.top1(v, v, block=3) == 1.0
    assert mmcl_linear.top1(v, v[[1, 0, 2, 3]], block=3) == 0.5


def test_short_run():
    torch.set_num_threads(1)
    out = mmcl_linear.run_seed(0, [500], n_test=1000, paired_epochs=10, unpaired_epochs=10, pool="hidden")
    numbers = [out["paired"], out["closed_form"], out["by_size"][500]["unpaired"], out["by_size"][500]["closed_form_pseudo"]]
    for result in numbers:
        assert 0.0 <= result["top1"] <= 1.0
        assert 0.0 <= result["sin_theta"] <= math.sqrt(mmcl_linear.R) + 1e-6
    assert out["paired"]["top1"] > 0.05  # chance is 0.001
    assert out["paired"]["sin_theta"] < 2.5
