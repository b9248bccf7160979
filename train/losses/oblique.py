"""Symmetric InfoNCE on the oblique manifold (docs/METHODS.md section 2; Sun, arXiv 2209.02127).

Features are K tokens per sample, (N, K, d/K); each token is L2-normalised on its own, so a sample is
a point of OB(d/K, K) = (S^{d/K-1})^K, and two samples compare token k against token k:

    sim(u, v) = sum_k <u_k, v_k>   in [-K, K],      logits = s * sim,      symmetric CE as CLIP.

sum_k <u_k, v_k> is the inner product of the flattened (N, K*d/K) per-token-normalised vectors, so
the similarity matrix is one matmul of the flattened features (ClipLoss does the rest, including the
distributed gathering). K = 1 (or (N, d) features) is ClipLoss exactly.

Logit scale. The similarity range grows from [-1, 1] to [-K, K], so the scale CLIP needs (init
1/0.07, cap 100) would make logits K times larger. The authors' released model code
(github.com/minogame/clip-mtob, modeling_clip_helper_mtob.py) uses the bare sum as logits: s = 1
in effect, at K = 16 a logit range of +-16, about CLIP's initial +-14.3. We keep s learnable
(its learned value is docs/METHODS.md's noise indicator) with:
    logit_scale_init = 1.0   the released model's effective scale (train.loop sets the model's
                             logit scale to it when it builds this loss)
    logit_scale_max  = 6.25  = 100 / 16: at the default K = 16 the logit range can reach CLIP's
                             capped +-100 and no further; far below CLIP's cap of 100.
    logit_scale_min  = 1.0   open_clip's floor (log s >= 0). Measured on the efficacy world at K = 16
                             the scale stays near 1 (0.985 with the floor at 0.1) and the cap never
                             binds (docs/RESULTS.md section 4).
The loss clamps the scale it is given to logit_scale_max; the loop keeps the parameter in [min, max].

Topology (`topology`, the control for "is it the product of spheres?"). "sphere" keeps the K tokens
(same towers, same capacity) but L2-normalises their concatenation once: one point of S^{d-1},

    sim(u, v) = <u / |u|, v / |v|>   in [-1, 1],   u = (u_1, ..., u_K) flattened,

which is ClipLoss on that vector. Its scale defaults are then CLIP's (init: the model's own, 1/0.07
for open_clip; range [1, 100]); the efficacy table's matched control sets init 16, the initial logit
range of K = 16 oblique at s = 1. The loop builds the model with the loss's topology (a sphere model
returns the (N, D) concatenation), so evaluation compares features as training did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses.clip import ClipLoss

SCALES = {"oblique": (1.0, 1.0, 6.25), "sphere": (None, 1.0, 100.0)}  # topology -> default (init, min, max) of s


class ObliqueLoss(ClipLoss):
    """forward(image_features (N, K, d/K), text_features (N, K, d/K), logit_scale) -> {"loss", "i2t", "t2i"}.

    The logit-scale arguments left unset take the topology's defaults (SCALES)."""

    takes_weight = False

    def __init__(self, logit_scale_init: float | None = None, logit_scale_max: float | None = None,
                 logit_scale_min: float | None = None, topology: str = "oblique",
                 rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__(rank, world_size, gather_with_grad)
        if topology not in SCALES:
            raise ValueError(f"ObliqueLoss topology must be 'oblique' or 'sphere', got {topology!r}")
        init, low, high = (given if given is not None else default for given, default in
                           zip((logit_scale_init, logit_scale_min, logit_scale_max), SCALES[topology]))
        if not 0 < low <= high or (init is not None and not low <= init <= high):  # the loop keeps s in [min, max]
            raise ValueError(f"ObliqueLoss needs 0 < logit_scale_min <= logit_scale_init <= logit_scale_max, "
                             f"got {low}, {init} and {high}")
        self.logit_scale_init, self.logit_scale_max, self.logit_scale_min = init, high, low
        self.topology = topology

    def forward(self, image_features, text_features, logit_scale) -> dict[str, torch.Tensor]:
        u, w = tokens(image_features), tokens(text_features)
        if u.shape[1:] != w.shape[1:]:
            raise ValueError(f"oblique features must be (N, K, d) with equal K and d, got {tuple(u.shape)} "
                             f"and {tuple(w.shape)}")
        if self.topology == "sphere":  # the K tokens as one token: normalised once, below
            u, w = u.flatten(1).unsqueeze(1), w.flatten(1).unsqueeze(1)
        u, w = F.normalize(u, dim=-1), F.normalize(w, dim=-1)  # each token on its own sphere
        scale = torch.as_tensor(logit_scale, dtype=u.dtype, device=u.device).clamp(max=self.logit_scale_max)
        return super().forward(u.flatten(1), w.flatten(1), scale)  # <flat u, flat w> = sum_k <u_k, w_k>


def tokens(features: torch.Tensor) -> torch.Tensor:
    """(N, d) stock features are K = 1: (N, 1, d)."""
    return features.unsqueeze(1) if features.dim() == 2 else features
