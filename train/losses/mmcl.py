"""Multimodal contrastive learning with unpaired data (docs/METHODS.md section 5; Nakada et al., AISTATS 2023).

MMCLLoss, the general family on similarities s_ij = <v_i, t_j> (encoders G1, G2: v = G1 x, t = G2 y):

    L_paper = 1/n sum_i phi(eps + sum_{j!=i} psi(s_ij - s_ii))          (rows: image i against texts)
            + 1/n sum_i phi(eps + sum_{j!=i} psi(s_ji - s_ii))          (columns: text i against images)
            + rho/2 ||G1^T G2||_F^2                                      (only when G1, G2 are passed)

    "clip":   phi = tau * log, psi = exp(. / tau), eps = 1
    "linear": phi = psi = identity,              eps = 0
    (eps can be set for either.) Neither builds psi's N x N matrix of exps: "clip" is computed as the
    cross-entropy of the logits s_ij / tau (with log eps added at the positive when eps != 1), and
    "linear" needs no N x N matrix at all: sum_{j!=i} (s_ij - s_ii) = <v_i, sum_j t_j> - N s_ii.

Scaling. For "clip", tau * log(1 + sum_{j!=i} exp((s_ij - s_ii)/tau)) = tau * CE_i(logits s_ij / tau),
so L_paper = 2 tau * L_clip at logit scale 1/tau. We report L_paper / (2 tau), every term included:

    loss = (i2t + t2i) / 2 + reg,   i2t = rows / tau,   t2i = columns / tau,   reg = rho/2 ||G1^T G2||^2 / (2 tau)

so "clip" IS ClipLoss at logit scale s = 1/tau (same value, same gradients), and at a fixed tau every
choice has the paper's minimisers (a constant factor only rescales the step). tau is 1/s of the
logit scale passed in, unless `tau` is given: then it is fixed (the paper's linear experiment uses
tau = 1, where loss = L_paper / 2). Use a fixed tau with "linear" and with rho > 0: with a learned
scale the linear loss, (s/2) * L_paper, rewards a larger s without bound (up to the loop's cap).

UnpairedLoss, pseudo-pairing of m unpaired images and m unpaired texts, S = logits = s * U W^T:

    E = the K = m largest entries of S,
    L_u = 1/(2m) [ -2 sum_{(i,j) in E} S_ij + sum_i logsumexp_j S_ij + sum_j logsumexp_i S_ij ]

or, with `pairs` from a frozen teacher (`teacher_pairs`: argmax partner per row and per column),
rows take their row partner and columns their column partner as positive. It is local to the
process (not gathered). `joint` adds gamma * L_u to the paired terms (docs/METHODS.md: L_pairs + gamma L_u).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from train.losses.clip import ClipLoss, flat

CHOICES = {"clip": 1.0, "linear": 0.0}  # phi/psi choice -> its default eps


class MMCLLoss(ClipLoss):
    """forward(image_features, text_features, logit_scale, image_encoder=None, text_encoder=None)
    -> {"loss", "i2t", "t2i", "reg"}; image_encoder / text_encoder are G1 (r, d1) and G2 (r, d2)."""

    takes_weight = False

    def __init__(self, choice: str = "clip", tau: float | None = None, eps: float | None = None, rho: float = 0.0,
                 rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__(rank, world_size, gather_with_grad)
        if choice not in CHOICES:
            raise ValueError(f"MMCLLoss choice must be one of {sorted(CHOICES)}, got {choice!r}")
        if tau is not None and tau <= 0:
            raise ValueError(f"MMCLLoss tau must be > 0, got {tau}")
        self.choice, self.tau, self.rho = choice, tau, rho
        self.eps = CHOICES[choice] if eps is None else eps
        if self.eps < 0:
            raise ValueError(f"MMCLLoss eps must be >= 0, got {self.eps}")

    def forward(self, image_features, text_features, logit_scale, image_encoder=None,
                text_encoder=None) -> dict[str, torch.Tensor]:
        v, t = flat(image_features), flat(text_features)
        all_v, all_t = self.gather(v, t)
        tau = self.tau if self.tau is not None else 1.0 / logit_scale
        positives = self.positives(v.shape[0], v.device)
        if self.choice == "clip":
            # phi(eps + sum_{j!=i} psi(s_ij - s_ii)) / tau = log(eps + sum_{j!=i} exp(l_ij - l_ii)), l = s / tau
            per_image, per_text = self.logits(v, t, all_v, all_t, 1.0 / tau)
            i2t, t2i = self.clip_rows(per_image, positives), self.clip_rows(per_text, positives)
        else:
            # phi = psi = id: eps + sum_{j!=i} (s_ij - s_ii) = eps + <v_i, sum_j t_j> - N s_ii, no N x N matrix
            s_pos, n_all = (v * t).sum(1), all_t.shape[0]
            i2t = (self.eps + v @ all_t.sum(0) - n_all * s_pos).mean() / tau
            t2i = (self.eps + t @ all_v.sum(0) - n_all * s_pos).mean() / tau
        reg = i2t.new_zeros(())
        if self.rho and image_encoder is not None and text_encoder is not None:
            reg = self.rho / 2 * (image_encoder.T @ text_encoder).square().sum() / (2 * tau)
        loss = (i2t + t2i) / 2 + reg
        if self.tau is not None and isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad:
            loss = loss + 0 * logit_scale  # a fixed tau leaves the model's scale unused; DDP fails on unused params
        return {"loss": loss, "i2t": i2t, "t2i": t2i, "reg": reg}

    def clip_rows(self, logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """mean_i log(eps + sum_{j!=i} exp(l_ij - l_ii)) = mean_i [logsumexp_j l~_ij - l_ii], where l~ is l with
        log(eps) added at the positive: for CLIP's eps = 1, l~ = l and this is the cross-entropy itself."""
        if self.eps == 1:
            return F.cross_entropy(logits, positives)
        rows = torch.arange(logits.shape[0], device=logits.device)
        logit_pos = logits[rows, positives]
        log_eps = math.log(self.eps) if self.eps > 0 else float("-inf")
        shifted = logits.index_put((rows, positives), logit_pos + log_eps)
        return (torch.logsumexp(shifted, dim=1) - logit_pos).mean()


class Pairs(NamedTuple):
    """Pseudo-pairs of an unpaired batch: a text for every image, an image for every text."""
    image_to_text: torch.Tensor  # (m_images,) column of each row's partner
    text_to_image: torch.Tensor  # (m_texts,) row of each column's partner


@torch.no_grad()
def teacher_pairs(similarity: torch.Tensor) -> Pairs:
    """The frozen-teacher variant: each image's argmax text and each text's argmax image."""
    return Pairs(similarity.argmax(dim=1), similarity.argmax(dim=0))


class UnpairedLoss(nn.Module):
    """forward(image_features (m, d), text_features (m, d), logit_scale, pairs=None) -> {"loss", "i2t", "t2i"}.

    i2t = 1/m [sum_i logsumexp_j S_ij - sum_E S_ij], t2i likewise over columns, loss = (i2t + t2i) / 2,
    which is L_u above. With m_images != m_texts (a short last batch), K = min of the two and each
    direction averages over its own count.
    """

    def forward(self, image_features, text_features, logit_scale, pairs: Pairs | None = None) -> dict[str, torch.Tensor]:
        logits = logit_scale * flat(image_features) @ flat(text_features).T
        if pairs is None:
            positive = self.positives(logits)
            row_pos = col_pos = logits[positive].sum()  # sum over E, counted in both directions
        else:
            rows = torch.arange(logits.shape[0], device=logits.device)
            cols = torch.arange(logits.shape[1], device=logits.device)
            row_pos = logits[rows, pairs.image_to_text.to(logits.device)].sum()
            col_pos = logits[pairs.text_to_image.to(logits.device), cols].sum()
        i2t = (torch.logsumexp(logits, dim=1).sum() - row_pos) / logits.shape[0]
        t2i = (torch.logsumexp(logits, dim=0).sum() - col_pos) / logits.shape[1]
        return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i}

    @staticmethod
    @torch.no_grad()
    def positives(logits: torch.Tensor) -> torch.Tensor:
        """Boolean mask of E: the K = min(m_images, m_texts) largest entries of the similarity matrix."""
        k = min(logits.shape)
        mask = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
        mask[logits.flatten().topk(k).indices] = True
        return mask.view_as(logits)


def joint(pair_terms: dict | None, unpaired_terms: dict, gamma: float) -> dict:
    """L = L_pairs + gamma * L_u, or L_u alone without pair terms (the sequential schedule's unpaired stage);
    the unpaired terms are kept as unpaired_<name>."""
    unpaired = {f"unpaired_{name}": term for name, term in unpaired_terms.items()}
    if pair_terms is None:
        return {"loss": unpaired_terms["loss"], **unpaired}
    return {**pair_terms, **unpaired, "loss": pair_terms["loss"] + gamma * unpaired_terms["loss"]}
