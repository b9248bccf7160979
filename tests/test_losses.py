"""The training losses (docs/METHODS.md sections 1, 2, 5): each reduces to the CLIP loss in its degenerate
setting, matches a straight-from-the-formula reference, passes gradcheck, is invariant to permuting
the batch, and, on two gloo processes, its local loss averaged over ranks is the single-process
loss of the global batch with the gradients that makes DDP exact."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port

from train.distributed import gather_features
from train.losses import (
    ClipLoss,
    MMCLLoss,
    ObliqueLoss,
    Pairs,
    SoftClipLoss,
    UnpairedLoss,
    build_loss,
    joint,
    teacher_pairs,
)
from train.losses.softclip import soft_target

D64 = torch.float64


def unit(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=D64), dim=-1)


def scale(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=D64)


def reference_clip(v, t, s):
    """L_clip straight from docs/METHODS.md: 1/2 [CE(s V T^T, I) + CE(s T V^T, I)]."""
    logits = s * v @ t.T
    labels = torch.arange(len(v))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def close(a, b, tol=1e-6, what=""):
    try:
        torch.testing.assert_close(torch.as_tensor(a, dtype=D64), torch.as_tensor(b, dtype=D64), rtol=0, atol=tol)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}" if what else str(err)) from None


# ------------------------------------------------------------------ degenerate settings are CLIP
def test_clip_loss_is_the_formula_and_names_its_terms():
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(7.0)
    out = ClipLoss()(v, t, s)
    assert set(out) == {"loss", "i2t", "t2i"}
    close(out["loss"], reference_clip(v, t, s))
    close(out["i2t"], F.cross_entropy(s * v @ t.T, torch.arange(8)))
    close(out["t2i"], F.cross_entropy(s * t @ v.T, torch.arange(8)))


@pytest.mark.parametrize("target", ["teacher", "self"])
def test_softclip_alpha0_beta0_is_clip(target):
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(5.0)
    teacher = {"teacher_image": unit(8, 10, seed=2), "teacher_text": unit(8, 10, seed=3)} if target == "teacher" else {}
    out = SoftClipLoss(alpha=0.0, beta=0.0, target=target)(v, t, s, **teacher)
    assert set(out) == {"loss", "soft", "neg"}
    close(out["loss"], ClipLoss()(v, t, s)["loss"])
    close(out["loss"], reference_clip(v, t, s))


@pytest.mark.parametrize("as_tokens", [True, False])
def test_oblique_k1_is_clip(as_tokens):
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(5.0)  # s below the default cap of 6.25
    u, w = (v.unsqueeze(1), t.unsqueeze(1)) if as_tokens else (v, t)
    out = ObliqueLoss()(u, w, s)
    close(out["loss"], ClipLoss()(v, t, s)["loss"])
    close(out["loss"], reference_clip(v, t, s))
    high = ObliqueLoss(logit_scale_max=100.0)(u, w, scale(30.0))["loss"]  # the cap set at CLIP's
    close(high, reference_clip(v, t, scale(30.0)))


def test_mmcl_clip_choice_is_clip_loss_at_scale_one_over_tau():
    """Stated scaling: L_paper = 2 tau L_clip(s = 1/tau); MMCLLoss reports L_paper / (2 tau) = L_clip."""
    v, t = unit(8, 6, seed=0), unit(8, 6, seed=1)
    tau = 0.2
    s = scale(1 / tau)
    out = MMCLLoss("clip")(v, t, s)
    assert set(out) == {"loss", "i2t", "t2i", "reg"}
    clip = ClipLoss()(v, t, s)
    for name in ("loss", "i2t", "t2i"):
        close(out[name], clip[name])
    close(out["loss"], reference_clip(v, t, s))
    close(MMCLLoss("clip", tau=tau)(v, t, scale(99.0))["loss"], reference_clip(v, t, s))  # fixed tau ignores s

    sim = (v @ t.T).tolist()  # the paper's family term by term: phi = tau log, psi = exp(./tau), eps = 1
    n = len(sim)
    rows = sum(tau * math.log(1 + sum(math.exp((sim[i][j] - sim[i][i]) / tau) for j in range(n) if j != i))
               for i in range(n)) / n
    cols = sum(tau * math.log(1 + sum(math.exp((sim[j][i] - sim[i][i]) / tau) for j in range(n) if j != i))
               for i in range(n)) / n
    close(rows + cols, 2 * tau * reference_clip(v, t, s))
    close(rows + cols, 2 * tau * out["loss"])


@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
def test_mmcl_clip_choice_with_another_eps_is_the_formula(eps):
    v, t, tau = unit(6, 5, seed=0), unit(6, 5, seed=1), 0.25
    sim, n = (v @ t.T).tolist(), 6

    def term(pairs):  # phi(eps + sum_{j!=i} psi(.)), phi = tau log, psi = exp(./tau)
        return tau * math.log(eps + sum(math.exp(x / tau) for x in pairs))

    rows = sum(term([sim[i][j] - sim[i][i] for j in range(n) if j != i]) for i in range(n)) / n
    cols = sum(term([sim[j][i] - sim[i][i] for j in range(n) if j != i]) for i in range(n)) / n
    out = MMCLLoss("clip", eps=eps)(v, t, scale(1 / tau))
    close(out["i2t"], rows / tau)
    close(out["t2i"], cols / tau)
    close(out["loss"], (rows + cols) / (2 * tau))  # L_paper / (2 tau)


def test_mmcl_linear_matches_a_hand_computation():
    # v = rows of the similarity matrix, t = identity: s = [[1, .5], [.2, .8]].
    v, t = torch.tensor([[1.0, 0.5], [0.2, 0.8]], dtype=D64), torch.eye(2, dtype=D64)
    g1, g2 = torch.tensor([[1.0, 2.0]], dtype=D64), torch.tensor([[3.0, 0.0]], dtype=D64)
    # rows: (0.5 - 1) + (0.2 - 0.8) = -1.1, / n = -0.55; columns: (0.2 - 1) + (0.5 - 0.8) = -1.1, / n = -0.55
    # rho/2 ||G1^T G2||^2 = 0.1/2 * ||[[3, 0], [6, 0]]||^2 = 0.05 * 45 = 2.25;  L_paper = 1.15
    out = MMCLLoss("linear", tau=1.0, rho=0.1)(v, t, scale(1.0), image_encoder=g1, text_encoder=g2)
    close(out["i2t"], -0.55)
    close(out["t2i"], -0.55)
    close(out["reg"], 2.25 / 2)
    close(out["loss"], 1.15 / 2)  # L_paper / (2 tau), tau = 1
    eps = MMCLLoss("linear", tau=0.5, eps=0.3)(v, t, scale(1.0))
    close(eps["loss"], (2 * (0.3 - 0.55)) / (2 * 0.5))
    assert MMCLLoss("linear", tau=1.0, rho=0.1)(v, t, scale(1.0))["reg"] == 0  # no encoders: no regulariser


# ------------------------------------------------------------------ SoftCLIP against its formula
def reference_softclip(v, t, s, a, b, tau_s, alpha, beta):
    """docs/METHODS.md section 1 written out: q/(1 - q_ii) divided as printed, pneg by an explicit sum."""
    n = len(v)
    logits = s * v @ t.T
    eye = torch.eye(n, dtype=D64)

    def kl(y, logp):  # mean_i sum_j y log(y / p), 0 log 0 = 0
        return torch.where(y > 0, y * (torch.log(y.clamp_min(1e-300)) - logp), torch.zeros_like(y)).sum(1).mean()

    def negatives(q, lg):
        qneg = (q / (1 - q.diagonal())[:, None]) * (1 - eye)
        total = 0.0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            log_norm = torch.logsumexp(lg[i, others], 0)
            total = total + sum(qneg[i, j] * (torch.log(qneg[i, j]) - (lg[i, j] - log_norm)) for j in others)
        return total / n

    q_i, q_t = torch.softmax(a @ a.T / tau_s, 1), torch.softmax(b @ b.T / tau_s, 1)
    y_i, y_t = (1 - alpha)[:, None] * eye + alpha[:, None] * q_i, (1 - alpha)[:, None] * eye + alpha[:, None] * q_t
    soft = (kl(y_i, logits.log_softmax(1)) + kl(y_t, logits.T.log_softmax(1))) / 2
    neg = (negatives(q_i, logits) + negatives(q_t, logits.T)) / 2
    return soft + beta * neg, soft, neg


@pytest.mark.parametrize("target", ["teacher", "self"])
def test_softclip_matches_the_formula(target):
    v, t, s = unit(6, 5, seed=0), unit(6, 5, seed=1), scale(4.0)
    a, b = (unit(6, 7, seed=2), unit(6, 7, seed=3)) if target == "teacher" else (v, t)
    tau_s = 0.3 if target == "teacher" else 1 / 4.0
    teacher = {"teacher_image": a, "teacher_text": b} if target == "teacher" else {}
    out = SoftClipLoss(alpha=0.3, beta=0.7, target=target, tau_s=0.3 if target == "teacher" else None)(
        v, t, s, **teacher)
    loss, soft, neg = reference_softclip(v, t, s, a, b, tau_s, torch.full((6,), 0.3, dtype=D64), 0.7)
    close(out["loss"], loss)
    close(out["soft"], soft)
    close(out["neg"], neg)


def test_softclip_orthogonal_teacher_gives_a_near_one_hot_target():
    n = 6
    a = b = torch.eye(n, dtype=D64)  # S_I = S_T = I: no sample resembles another
    q = soft_target(a @ a.T / 0.01, torch.ones(n, dtype=D64), torch.arange(n))  # alpha = 1: y = q
    close(q, torch.eye(n), tol=1e-12)
    v, t, s = unit(n, 6, seed=0), unit(n, 6, seed=1), scale(5.0)
    out = SoftClipLoss(alpha=0.5, beta=0.0, tau_s=0.01)(v, t, s, teacher_image=a, teacher_text=b)
    close(out["loss"], reference_clip(v, t, s))


def test_softclip_self_target_is_detached():
    v, t, s = unit(6, 5, seed=0).requires_grad_(), unit(6, 5, seed=1).requires_grad_(), scale(4.0).requires_grad_()
    loss = SoftClipLoss(target="self", alpha=0.3, beta=0.7)
    z_image, z_text = loss.scaled_self_similarity(v, t, v, t, s, None, None)
    assert not z_image.requires_grad and not z_text.requires_grad
    close(z_image, 4.0 * v @ v.T, tol=1e-12)  # tau_s = 1/s of the student
    close(z_text, 4.0 * t @ t.T, tol=1e-12)
    grads = torch.autograd.grad(loss(v, t, s)["loss"], (v, t, s))
    # The formula in plain autograd: with the target built from explicitly detached copies (a = v, b = t,
    # tau_s = 1/s, all stop-gradient) the gradients must agree; through a live target they must not.
    alpha = torch.full((6,), 0.3, dtype=D64)
    detached = reference_softclip(v, t, s, v.detach(), t.detach(), 1 / s.detach(), alpha, 0.7)[0]
    for mine, reference in zip(grads, torch.autograd.grad(detached, (v, t, s))):
        close(mine, reference, tol=1e-10)
    live = reference_softclip(v, t, s, v, t, 1 / s, alpha, 0.7)[0]
    for mine, through in zip(grads, torch.autograd.grad(live, (v, t, s))):
        assert (mine - through).abs().max() > 1e-3  # the check above could tell a gradient through the target


def test_softclip_self_target_runs_at_the_students_temperature():
    """target self with tau_s unset is tau_s = 1/s of the student, not the teacher's fallback 0.01."""
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(4.0)
    unset = SoftClipLoss(target="self", alpha=0.4, beta=1.0)(v, t, s)
    own = SoftClipLoss(target="self", alpha=0.4, beta=1.0, tau_s=1 / 4.0)(v, t, s)
    teachers = SoftClipLoss(target="self", alpha=0.4, beta=1.0, tau_s=0.01)(v, t, s)
    for term in unset:
        close(unset[term], own[term], tol=1e-12)
    assert abs(unset["loss"] - teachers["loss"]) > 1e-3


def test_softclip_negative_target_does_not_depend_on_alpha():
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(5.0)
    teacher = {"teacher_image": unit(8, 6, seed=2), "teacher_text": unit(8, 6, seed=3)}
    negs = [SoftClipLoss(alpha=alpha, tau_s=0.1)(v, t, s, **teacher)["neg"] for alpha in (0.0, 0.2, 0.9, 1.0)]
    for neg in negs[1:]:
        close(neg, negs[0], tol=1e-12)
    # and the masked softmax it uses is q[i, j] / (1 - q[i, i]) exactly
    z = teacher["teacher_image"] @ teacher["teacher_image"].T / 0.1
    q = z.softmax(1)
    mask = torch.eye(8, dtype=torch.bool)
    close(z.masked_fill(mask, float("-inf")).softmax(1), (q / (1 - q.diagonal())[:, None]).masked_fill(mask, 0), 1e-12)


def test_softclip_noise_adaptive_alpha():
    v, t, s = unit(8, 6, seed=0), unit(8, 6, seed=1), scale(5.0)
    teacher = {"teacher_image": unit(8, 6, seed=2), "teacher_text": unit(8, 6, seed=3)}
    adaptive = SoftClipLoss(alpha_min=0.1, alpha_max=0.6, tau_s=0.1)
    clean = adaptive(v, t, s, clean_prob=torch.ones(8), **teacher)
    fixed = SoftClipLoss(alpha=0.1, tau_s=0.1)(v, t, s, **teacher)
    for name in fixed:
        close(clean[name], fixed[name], tol=1e-12)
    noisy = adaptive(v, t, s, clean_prob=torch.zeros(8), **teacher)
    close(noisy["loss"], SoftClipLoss(alpha=0.6, tau_s=0.1)(v, t, s, **teacher)["loss"], tol=1e-12)
    c = torch.rand(8, generator=torch.Generator().manual_seed(4), dtype=D64)
    alpha = 0.1 + 0.5 * (1 - c)
    reference = reference_softclip(v, t, s, teacher["teacher_image"], teacher["teacher_text"], 0.1, alpha, 1.0)[0]
    close(adaptive(v, t, s, clean_prob=c, **teacher)["loss"], reference)
    with pytest.raises(ValueError, match="clean_prob"):
        adaptive(v, t, s, **teacher)
    with pytest.raises(ValueError, match="teacher_image"):
        SoftClipLoss()(v, t, s)


# ------------------------------------------------------------------ oblique
def test_oblique_normalises_each_token_on_its_own():
    u, w, s = torch.randn(6, 3, 4, dtype=D64), torch.randn(6, 3, 4, dtype=D64), scale(2.0)
    base = ObliqueLoss()(u, w, s)["loss"]
    scaled = u.clone()
    scaled[2, 1] *= 7.0  # one token of one sample
    close(ObliqueLoss()(scaled, w, s)["loss"], base, tol=1e-12)
    # and the similarity is sum_k <u_k, w_k>, token k against token k only
    un, wn = F.normalize(u, dim=-1), F.normalize(w, dim=-1)
    sim = torch.einsum("nkd,mkd->nm", un, wn)
    labels = torch.arange(6)
    close(base, (F.cross_entropy(s * sim, labels) + F.cross_entropy(s * sim.T, labels)) / 2)


def test_oblique_caps_the_logit_scale():
    loss = ObliqueLoss()
    assert (loss.logit_scale_init, loss.logit_scale_max) == (1.0, 6.25)
    u, w = unit(6, 4, 3, seed=0), unit(6, 4, 3, seed=1)
    high = scale(50.0).requires_grad_()
    out = loss(u, w, high)["loss"]
    close(out, loss(u, w, scale(6.25))["loss"], tol=1e-12)
    out.backward()
    assert high.grad == 0  # above the cap the scale gets no gradient
    with pytest.raises(ValueError, match="equal K"):
        loss(unit(6, 4, 3, seed=0), unit(6, 2, 6, seed=1), scale(1.0))
    with pytest.raises(ValueError, match="logit_scale_min <= logit_scale_init"):  # below the floor it would not hold
        ObliqueLoss(logit_scale_init=0.5)
    assert ObliqueLoss(logit_scale_init=0.5, logit_scale_min=0.25).logit_scale_min == 0.25
    # the K = 1 control at K = 16's logit range: s from 16, kept in [16, 100]
    matched = ObliqueLoss(logit_scale_init=16, logit_scale_min=16, logit_scale_max=100)
    v, t = unit(6, 5, seed=2), unit(6, 5, seed=3)
    close(matched(v, t, scale(40.0))["loss"], reference_clip(v, t, scale(40.0)))


def test_oblique_sphere_is_clip_on_the_jointly_normalised_tokens():
    u, w, s = torch.randn(6, 3, 4, dtype=D64), torch.randn(6, 3, 4, dtype=D64), scale(9.0)
    sphere = ObliqueLoss(topology="sphere")
    out = sphere(u, w, s)
    flat_u, flat_w = F.normalize(u.flatten(1), dim=-1), F.normalize(w.flatten(1), dim=-1)
    close(out["loss"], reference_clip(flat_u, flat_w, s))
    for term, value in ClipLoss()(flat_u, flat_w, s).items():
        close(out[term], value)
    # not the oblique similarity: scaling one token moves the whole vector's direction
    scaled = u.clone()
    scaled[2, 1] *= 7.0
    assert abs(sphere(scaled, w, s)["loss"] - out["loss"]) > 1e-3
    assert abs(ObliqueLoss(logit_scale_max=100.0)(u, w, s)["loss"] - out["loss"]) > 1e-3
    # CLIP's scale for a [-1, 1] similarity: the model's own init, range [1, 100]
    assert (sphere.logit_scale_init, sphere.logit_scale_min, sphere.logit_scale_max) == (None, 1.0, 100.0)
    matched = ObliqueLoss(topology="sphere", logit_scale_init=16, logit_scale_min=1, logit_scale_max=100)
    assert (matched.logit_scale_init, matched.topology) == (16, "sphere")
    with pytest.raises(ValueError, match="topology must be 'oblique' or 'sphere'"):
        ObliqueLoss(topology="torus")


# ------------------------------------------------------------------ unpaired pseudo-pairs
def brute_force_unpaired(S):
    m = len(S)
    entries = sorted(((S[i][j], i, j) for i in range(m) for j in range(m)), reverse=True)[:m]
    lse_rows = sum(math.log(sum(math.exp(S[i][j]) for j in range(m))) for i in range(m))
    lse_cols = sum(math.log(sum(math.exp(S[i][j]) for i in range(m))) for j in range(m))
    return (-2 * sum(e[0] for e in entries) + lse_rows + lse_cols) / (2 * m), {(i, j) for _, i, j in entries}


def test_unpaired_loss_takes_the_m_largest_entries():
    m, s = 7, scale(3.0)
    # clustered features make several large entries share rows, so E is not a matching
    u = unit(m, 5, seed=0)
    w = F.normalize(u[[0, 0, 1, 2, 2, 3, 4]] + 0.3 * unit(m, 5, seed=1), dim=-1)
    S = s * u @ w.T
    mask = UnpairedLoss.positives(S)
    assert mask.sum() == m
    assert S[mask].min() > S[~mask].max()
    expected, entries = brute_force_unpaired(S.tolist())
    assert {tuple(ij) for ij in mask.nonzero().tolist()} == entries
    out = UnpairedLoss()(u, w, s)
    assert set(out) == {"loss", "i2t", "t2i"}
    close(out["loss"], expected)


def test_teacher_pairs_on_a_hand_made_matrix():
    S = torch.tensor([[0.1, 0.9, 0.3],
                      [0.8, 0.2, 0.7],
                      [0.6, 0.5, 0.4]])
    pairs = teacher_pairs(S)
    assert isinstance(pairs, Pairs)
    assert pairs.image_to_text.tolist() == [1, 0, 0]  # argmax of each row
    assert pairs.text_to_image.tolist() == [1, 0, 1]  # argmax of each column
    u, w, s = unit(3, 4, seed=0), unit(3, 4, seed=1), scale(2.0)
    L = (s * u @ w.T).tolist()

    def lse(xs):
        return math.log(sum(math.exp(x) for x in xs))

    i2t = sum(lse(L[i]) - L[i][[1, 0, 0][i]] for i in range(3)) / 3
    t2i = sum(lse([L[i][j] for i in range(3)]) - L[[1, 0, 1][j]][j] for j in range(3)) / 3
    out = UnpairedLoss()(u, w, s, pairs=pairs)
    close(out["i2t"], i2t)
    close(out["t2i"], t2i)
    close(out["loss"], (i2t + t2i) / 2)


def test_unpaired_loss_never_reads_positions():
    """Aligned batching hands the loss a batch whose row i image and text i are partners; the loss must
    not see that: shuffling the texts changes nothing, with top-K or with teacher pairs."""
    m, s = 6, scale(4.0)
    u, w = unit(m, 5, seed=2), unit(m, 5, seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    close(UnpairedLoss()(u, w, s)["loss"], UnpairedLoss()(u, w[perm], s)["loss"])
    teacher_u, teacher_w = unit(m, 5, seed=4), unit(m, 5, seed=5)
    by_teacher = UnpairedLoss()(u, w, s, pairs=teacher_pairs(teacher_u @ teacher_w.T))
    shuffled = UnpairedLoss()(u, w[perm], s, pairs=teacher_pairs(teacher_u @ teacher_w[perm].T))
    close(by_teacher["loss"], shuffled["loss"])
    assert not torch.allclose(by_teacher["loss"], UnpairedLoss()(u, w, s)["loss"])  # the pairs do matter


def test_joint_merges_the_terms():
    pair_terms = {"loss": torch.tensor(2.0), "i2t": torch.tensor(1.5)}
    unpaired = {"loss": torch.tensor(4.0), "i2t": torch.tensor(3.0)}
    merged = joint(pair_terms, unpaired, gamma=0.25)
    assert merged["loss"] == 3.0 and merged["i2t"] == 1.5
    assert merged["unpaired_loss"] == 4.0 and merged["unpaired_i2t"] == 3.0


# ------------------------------------------------------------------ every loss: gradcheck, permutations
def cases():
    """name -> (loss, inputs, per-sample keyword inputs, non-per-sample keyword inputs). N = 4, d = 6."""
    n, d = 4, 6
    a, b, c = unit(n, 5, seed=10), unit(n, 5, seed=11), torch.tensor([0.9, 0.2, 0.5, 1.0], dtype=D64)
    g1, g2 = torch.randn(3, d, dtype=D64, generator=torch.Generator().manual_seed(12)), \
        torch.randn(3, d, dtype=D64, generator=torch.Generator().manual_seed(13))
    flat, tok = (unit(n, d, seed=0), unit(n, d, seed=1)), (2 * unit(n, 2, 3, seed=2), 0.5 * unit(n, 2, 3, seed=3))
    return {
        "clip": (ClipLoss(), flat, {}, {}),
        "softclip_teacher": (SoftClipLoss(alpha=0.3, beta=0.5, tau_s=0.2), flat,
                             {"teacher_image": a, "teacher_text": b}, {}),
        "softclip_adaptive": (SoftClipLoss(alpha_min=0.1, alpha_max=0.5, tau_s=0.2), flat,
                              {"teacher_image": a, "teacher_text": b, "clean_prob": c}, {}),
        "softclip_self": (SoftClipLoss(target="self"), flat, {}, {}),
        "oblique": (ObliqueLoss(), tok, {}, {}),
        "oblique_sphere": (ObliqueLoss(topology="sphere"), tok, {}, {}),
        "mmcl_clip": (MMCLLoss("clip", rho=0.1), flat, {}, {"image_encoder": g1, "text_encoder": g2}),
        "mmcl_clip_eps": (MMCLLoss("clip", eps=0.5), flat, {}, {}),
        "mmcl_linear": (MMCLLoss("linear", tau=0.5, rho=0.1), flat, {}, {"image_encoder": g1, "text_encoder": g2}),
        "unpaired": (UnpairedLoss(), flat, {}, {}),
    }


# the self target moves with the embeddings but is detached by design, so finite differences (which
# see the target move) and autograd (which must not) disagree there: it is checked by the test above.
@pytest.mark.parametrize("name", [k for k in cases() if k != "softclip_self"])
def test_gradcheck(name):
    loss, (v, t), per_sample, other = cases()[name]
    v, t, s = v.clone().requires_grad_(), t.clone().requires_grad_(), scale(2.5).requires_grad_()
    other = {k: x.clone().requires_grad_() for k, x in other.items()}
    keys = list(other)

    def f(v, t, s, *encoders):
        return loss(v, t, s, **per_sample, **dict(zip(keys, encoders)))["loss"]

    assert torch.autograd.gradcheck(f, (v, t, s, *other.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(cases()))
def test_permuting_the_batch_leaves_the_loss_unchanged(name):
    loss, (v, t), per_sample, other = cases()[name]
    s = scale(3.0)
    perm = torch.tensor([2, 0, 3, 1])
    base = loss(v, t, s, **per_sample, **other)
    permuted = loss(v[perm], t[perm], s, **{k: x[perm] for k, x in per_sample.items()}, **other)
    for term in base:
        close(permuted[term], base[term], tol=1e-12)


def test_build_loss_names_unknown_losses():
    assert isinstance(build_loss("softclip", alpha=0.1, target="self", rank=0, world_size=1), SoftClipLoss)
    assert {type(build_loss(n)) for n in ("clip", "oblique", "mmcl")} == {ClipLoss, ObliqueLoss, MMCLLoss}
    with pytest.raises(ValueError, match=r"'cosine'.*clip, mmcl, oblique, softclip"):
        build_loss("cosine")
    with pytest.raises(TypeError, match="gamma"):
        build_loss("softclip", gamma=1.0)


def test_gather_features_is_the_identity_on_one_process():
    x, y = torch.randn(3, 2), torch.randn(3, 4)
    gx, gy = gather_features(x, y)
    assert gx is x and gy is y


# ------------------------------------------------------------------ two gloo processes
WORLD, LOCAL_N = 2, 4


def distributed_cases():
    """(name, factory(**dist_kwargs), v, t, per-sample kwargs, replicated kwargs) on a global batch of 8."""
    n, d = WORLD * LOCAL_N, 6
    v, t = unit(n, d, seed=20), unit(n, d, seed=21)
    tv, tt = unit(n, 3, 2, seed=27) * 1.5, unit(n, 3, 2, seed=28) * 0.5  # tokens the loss normalises
    a, b = unit(n, 5, seed=22), unit(n, 5, seed=23)
    c = torch.rand(n, dtype=D64, generator=torch.Generator().manual_seed(24))
    g1 = torch.randn(3, d, dtype=D64, generator=torch.Generator().manual_seed(25))
    g2 = torch.randn(3, d, dtype=D64, generator=torch.Generator().manual_seed(26))
    return [
        ("clip", lambda **k: ClipLoss(**k), v, t, {}, {}),
        ("softclip_teacher", lambda **k: SoftClipLoss(alpha=0.3, beta=0.5, tau_s=0.2, **k), v, t,
         {"teacher_image": a, "teacher_text": b}, {}),
        ("softclip_adaptive", lambda **k: SoftClipLoss(alpha_min=0.1, alpha_max=0.5, tau_s=0.2, **k), v, t,
         {"teacher_image": a, "teacher_text": b, "clean_prob": c}, {}),
        ("softclip_self", lambda **k: SoftClipLoss(target="self", **k), v, t, {}, {}),
        ("oblique", lambda **k: ObliqueLoss(**k), tv, tt, {}, {}),
        ("oblique_sphere", lambda **k: ObliqueLoss(topology="sphere", **k), tv, tt, {}, {}),
        ("mmcl_clip", lambda **k: MMCLLoss("clip", **k), v, t, {}, {}),
        ("mmcl_linear", lambda **k: MMCLLoss("linear", tau=0.5, rho=0.1, **k), v, t, {},
         {"image_encoder": g1, "text_encoder": g2}),
    ]


def _distributed_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
        for name, make, v, t, per_sample, replicated in distributed_cases():
            # the single-process loss of the global batch, with its gradients
            v1, t1, s1 = v.clone().requires_grad_(), t.clone().requires_grad_(), scale(3.0).requires_grad_()
            single = make()(v1, t1, s1, **per_sample, **replicated)
            single["loss"].backward()
            for gather_with_grad in (True, False):
                vr, tr = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
                sr = scale(3.0).requires_grad_()
                local = make(rank=rank, world_size=WORLD, gather_with_grad=gather_with_grad)(
                    vr, tr, sr, **{k: x[rows] for k, x in per_sample.items()}, **replicated)
                local["loss"].backward()
                for term, value in local.items():  # every term: the mean over ranks is the global one
                    mean = value.detach().clone()
                    dist.all_reduce(mean)
                    close(mean / WORLD, single[term], 1e-9, f"{name} {term} gather_with_grad={gather_with_grad}")
                if not gather_with_grad:
                    continue  # without the gathered gradient the other ranks' use of vr as negatives is dropped
                # rank r's embedding gradient is W x the single-process slice (all_gather's backward sums
                # every rank's loss); the scale's, averaged over ranks as DDP does, is the single-process one.
                close(vr.grad, WORLD * v1.grad[rows], 1e-9, f"{name} image gradient")
                close(tr.grad, WORLD * t1.grad[rows], 1e-9, f"{name} text gradient")
                grad_s = sr.grad.clone()
                dist.all_reduce(grad_s)
                close(grad_s / WORLD, s1.grad, 1e-9, f"{name} logit-scale gradient")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch():
    import torch.multiprocessing as mp

    context = mp.spawn(_distributed_worker, args=(free_port(),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 180 s")


def test_weighted_clip_loss_reduces_to_clip_and_drops_zero_weight_rows():
    torch.manual_seed(0)
    v = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    plain = ClipLoss()(v, t, scale)["loss"]
    assert torch.allclose(ClipLoss()(v, t, scale, weight=torch.ones(6, dtype=torch.float64))["loss"], plain)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    logits = scale * v @ t.T
    rows = [i for i in range(6) if i != 2]
    expected = (F.cross_entropy(logits[rows], torch.tensor(rows)) + F.cross_entropy(logits.T[rows], torch.tensor(rows))) / 2
    assert torch.allclose(ClipLoss()(v, t, scale, weight=weight)["loss"], expected)
    v.requires_grad_(True)
    t.requires_grad_(True)
    w = torch.rand(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ClipLoss()(a, b, scale, weight=w)["loss"], (v, t))
