"""SoftCLIP: soft targets from intra-modal self-similarity (METHODS.md section 1; Gao et al., AAAI 2024).

From detached features a (image side) and b (text side), for local row i and gathered column j:

    q_i2t[i,:] = softmax_j(<a_i, a_j> / tau_s)          q_t2i[i,:] = softmax_j(<b_i, b_j> / tau_s)
    y[i,:]     = (1 - alpha_i) * onehot(i) + alpha_i * q[i,:]
    L_soft     = 1/2 [ mean_i KL(y_i2t[i] || p_i2t[i]) + mean_i KL(y_t2i[i] || p_t2i[i]) ]
    L_neg      = 1/2 [ mean_i KL(qneg_i2t[i] || pneg_i2t[i]) + (t2i) ],   qneg[i,j] = q[i,j] / (1 - q[i,i])
    L          = L_soft + beta * L_neg

p = softmax(s * V T^T) by rows; pneg = softmax of the same logits with the positive masked to -inf.
qneg is computed as the softmax of <a_i, a_j>/tau_s with the positive masked to -inf: the same number
as q[i,j] / (1 - q[i,i]), without the cancellation in 1 - q[i,i] when q[i,i] is near 1.
alpha = 0 and beta = 0 give L_clip exactly (KL to a one-hot target is the cross-entropy).

Sources (`target`):
- "teacher": a, b are the score stage's teacher embeddings of the batch (teacher_image, teacher_text),
  L2-normalised here (they arrive as float16) and detached. tau_s defaults to 0.01 = 1/100, the
  learned temperature of open_clip's pretrained teachers (their logit scale sits at the cap);
  pass tau_s = 1 / (the teacher's logit scale, scores/_summary.json) for any other teacher.
- "self": a, b are the student's own features, detached (stop-gradient: otherwise the target
  collapses onto the prediction); tau_s defaults to 1/s of the student, detached.

Noise-adaptive alpha (our extension): set alpha_min and alpha_max and pass clean_prob c;
alpha_i = alpha_min + (alpha_max - alpha_min) * (1 - c_i), so a doubted pair leans on its neighbours.

Distributed: v, t are gathered with grad and a, b without (see ClipLoss for the normalisation:
each rank averages over its rows, the mean over ranks is the global loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses.clip import ClipLoss, flat

TEACHER_TAU = 0.01


class SoftClipLoss(ClipLoss):
    """forward(image_features, text_features, logit_scale, teacher_image=None, teacher_text=None,
    clean_prob=None) -> {"loss", "soft", "neg"} ("neg" is 0, not computed, when beta = 0)."""

    def __init__(self, alpha: float = 0.2, beta: float = 1.0, target: str = "teacher", tau_s: float | None = None,
                 alpha_min: float | None = None, alpha_max: float | None = None,
                 rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__(rank, world_size, gather_with_grad)
        if target not in ("teacher", "self"):
            raise ValueError(f"SoftClipLoss target must be 'teacher' or 'self', got {target!r}")
        if (alpha_min is None) != (alpha_max is None):
            raise ValueError("SoftClipLoss: set both alpha_min and alpha_max for the noise-adaptive alpha, or neither")
        for name, value in (("alpha", alpha), ("alpha_min", alpha_min), ("alpha_max", alpha_max)):
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"SoftClipLoss {name} must be in [0, 1], got {value}")
        if tau_s is not None and tau_s <= 0:
            raise ValueError(f"SoftClipLoss tau_s must be > 0, got {tau_s}")
        self.alpha, self.beta, self.target, self.tau_s = alpha, beta, target, tau_s
        self.alpha_min, self.alpha_max = alpha_min, alpha_max

    def forward(self, image_features, text_features, logit_scale, teacher_image=None, teacher_text=None,
                clean_prob=None) -> dict[str, torch.Tensor]:
        v, t = flat(image_features), flat(text_features)
        all_v, all_t = self.gather(v, t)
        per_image, per_text = self.logits(v, t, all_v, all_t, logit_scale)
        positives = self.positives(v.shape[0], v.device)
        with torch.no_grad():
            sim_image, sim_text, tau_s = self.self_similarity(v, t, all_v, all_t, logit_scale,
                                                              teacher_image, teacher_text)
            z_image, z_text = sim_image / tau_s, sim_text / tau_s
            alpha = self.alphas(clean_prob, v)
            y_i2t = soft_target(z_image, alpha, positives)
            y_t2i = soft_target(z_text, alpha, positives)
        soft = (F.kl_div(per_image.log_softmax(1), y_i2t, reduction="batchmean")
                + F.kl_div(per_text.log_softmax(1), y_t2i, reduction="batchmean")) / 2
        neg = soft.new_zeros(())
        if self.beta:
            neg = (negatives_kl(per_image, z_image, positives) + negatives_kl(per_text, z_text, positives)) / 2
        return {"loss": soft + self.beta * neg, "soft": soft, "neg": neg}

    def self_similarity(self, v, t, all_v, all_t, logit_scale, teacher_image, teacher_text):
        """(S_I, S_T, tau_s): local rows against gathered columns, from detached features only."""
        if self.target == "self":
            tau_s = self.tau_s if self.tau_s is not None else 1.0 / torch.as_tensor(logit_scale).detach()
            return v.detach() @ all_v.detach().T, t.detach() @ all_t.detach().T, tau_s
        if teacher_image is None or teacher_text is None:
            raise ValueError("SoftClipLoss(target='teacher') needs teacher_image and teacher_text (the score stage's "
                             "teacher_image_emb / teacher_text_emb); use target='self' before scores exist")
        a = F.normalize(flat(teacher_image).detach().to(v.dtype), dim=-1)
        b = F.normalize(flat(teacher_text).detach().to(v.dtype), dim=-1)
        all_a, all_b = self.gather(a, b)
        return a @ all_a.T, b @ all_b.T, self.tau_s if self.tau_s is not None else TEACHER_TAU

    def alphas(self, clean_prob, v) -> torch.Tensor:
        """alpha per local pair: fixed, or alpha_min + (alpha_max - alpha_min) * (1 - c_i)."""
        if self.alpha_min is None:
            return torch.full((v.shape[0],), self.alpha, dtype=v.dtype, device=v.device)
        if clean_prob is None:
            raise ValueError("SoftClipLoss with alpha_min/alpha_max (noise-adaptive alpha) needs clean_prob "
                             "(the score stage's per-pair clean probability)")
        c = clean_prob.detach().to(dtype=v.dtype, device=v.device).reshape(-1)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * (1 - c)


def soft_target(scaled_sim: torch.Tensor, alpha: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """y = (1 - alpha_i) * onehot(positive_i) + alpha_i * softmax_j(scaled_sim[i, j])."""
    rows = torch.arange(scaled_sim.shape[0], device=scaled_sim.device)
    y = alpha[:, None] * scaled_sim.softmax(1)
    y[rows, positives] += 1 - alpha
    return y


def negatives_kl(logits: torch.Tensor, scaled_sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """mean_i KL(qneg[i] || pneg[i]) over the negatives only; both renormalised without the positive."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(logits.shape[0], device=logits.device), positives] = True
    with torch.no_grad():
        q_neg = scaled_sim.masked_fill(mask, float("-inf")).softmax(1)  # == q[i,j] / (1 - q[i,i]), 0 at i
    log_p_neg = logits.masked_fill(mask, float("-inf")).log_softmax(1)
    # The positive has target 0 and log-probability -inf; 0 * log 0 is 0 in a KL, so zero it out
    # (kl_div would otherwise compute 0 * inf = nan).
    return F.kl_div(log_p_neg.masked_fill(mask, 0.0), q_neg, reduction="batchmean")
