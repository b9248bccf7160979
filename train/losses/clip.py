"""CLIP's symmetric InfoNCE (docs/METHODS.md, the baseline every other loss reduces to).

    logits = s * V T^T,   L_clip = 1/2 [ CE(logits, I) + CE(logits^T, I) ]   (rows are the softmax axis)

Distributed (local loss against gathered features, as open_clip's ClipLoss(local_loss=True)): with
W ranks of n pairs each, rank r takes its own n rows against all W*n gathered columns, in both
directions, and its positives sit at columns r*n + i. It reports the mean over ITS n rows, so

    mean over ranks of the reported loss == L_clip of the single-process global batch of W*n.

Gradients (gather_with_grad=True, the default): the all_gather backward sums what every rank's loss
sends to rank r's features, so rank r's embedding gradient is W times the matching slice of the
single-process gradient of L_clip; the logit-scale gradient on rank r is d(L_r)/ds, whose mean
over ranks is the single-process one. DDP averages parameter gradients over ranks, which turns
both into exactly the single-process parameter gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import gather_features


def flat(features: torch.Tensor) -> torch.Tensor:
    """(N, K, d) multi-token features as (N, K*d): their inner product is sum_k <u_k, v_k>."""
    return features.flatten(1) if features.dim() > 2 else features


class ClipLoss(nn.Module):
    """Symmetric InfoNCE. forward(image_features, text_features, logit_scale) -> {"loss", "i2t", "t2i"}.

    Features are used as given (the towers normalise them, as in open_clip); logit_scale is s, not
    log s. "i2t" and "t2i" are the two cross-entropies, "loss" their mean.

    What the training loop reads of a loss; a new loss overrides what differs, the loop never looks further:
        score_fields       forward argument -> the score stage's column the batch must carry for it
        takes_weight       forward takes `weight`, a weight per pair (the curate stage's keep-list)
        logit_scale_init   s when training starts (None: the model's own, open_clip's 1/0.07)
        logit_scale_min/max the range the loop keeps s in after every step (open_clip's [1, 100])
        topology           how a K-token model (oblique_k > 1) normalises its features: "oblique", each
                           token on its own sphere; "sphere", the K tokens as one vector (train/oblique.py)
    """

    score_fields: dict[str, str] = {}
    takes_weight = True
    logit_scale_init: float | None = None
    logit_scale_min, logit_scale_max = 1.0, 100.0
    topology = "oblique"

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gather_features(*tensors, gather_with_grad=self.gather_with_grad, rank=self.rank,
                               world_size=self.world_size)

    def positives(self, n: int, device) -> torch.Tensor:
        """Column of each local row's own partner among the gathered columns."""
        return torch.arange(n, device=device) + self.rank * n

    def logits(self, v, t, all_v, all_t, logit_scale):
        """Local rows against gathered columns: (s v T_all^T, s t V_all^T), each (n, W*n)."""
        per_image = logit_scale * v @ all_t.T
        if self.world_size == 1:  # one matmul: the text rows are the image columns
            return per_image, per_image.T
        return per_image, logit_scale * t @ all_v.T

    def forward(self, image_features, text_features, logit_scale, weight=None) -> dict[str, torch.Tensor]:
        """`weight` (n,): a weight per local pair (the curate stage's reweighting), a weighted mean of its rows."""
        v, t = flat(image_features), flat(text_features)
        all_v, all_t = self.gather(v, t)
        per_image, per_text = self.logits(v, t, all_v, all_t, logit_scale)
        labels = self.positives(v.shape[0], v.device)
        i2t = weighted_cross_entropy(per_image, labels, weight)
        t2i = weighted_cross_entropy(per_text, labels, weight)
        return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i}


def weighted_cross_entropy(logits, labels, weight=None) -> torch.Tensor:
    if weight is None:
        return F.cross_entropy(logits, labels)
    weight = weight.to(logits.dtype)
    return (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum().clamp_min(1e-12)
