"""SoftCLIP: soft targets from intra-modal self-similarity (docs/METHODS.md section 1; Gao et al., AAAI 2024).

From detached features a (image side) and b (text side), for local row i and gathered column j:

    q_i2t[i,:] = softmax_j(<a_i, a_j> / tau_s)          q_t2i[i,:] = softmax_j(<b_i, b_j> / tau_s)
    y[i,:]     = (1 - alpha_i) * onehot(i) + alpha_i * q[i,:]
    L_soft     = 1/2 [ mean_i KL(y_i2t[i] || p_i2t[i]) + mean_i KL(y_t2i[i] || p_t2i[i]) ]
    L_neg      = 1/2 [ mean_i KL(qneg_i2t[i] || pneg_i2t[i]) + (t2i) ],   qneg[i,j] = q[i,j] / (1 - q[i,i])
    L          = L_soft + beta * L_neg

p = softmax(s * V T^T) by rows; pneg = softmax of the same logits with the positive masked to -inf
(never p / (1 - p_ii)); qneg likewise = softmax of <a_i, a_j>/tau_s with the positive masked, the
same number as q[i,j] / (1 - q[i,i]) without the cancellation in 1 - q[i,i] when q[i,i] is near 1.
alpha = 0 and beta = 0 give L_clip exactly (KL to a one-hot target is the cross-entropy).

How it is computed (one N x N pass shared by both terms). Off the positive, y = a_i * qneg with
a_i = alpha_i (1 - q_ii) and p = b_i * pneg with b_i = 1 - p_ii, so the chain rule of KL splits

    KL(y_i || p_i) = KL((1 - a_i, a_i) || (1 - b_i, b_i)) + a_i * KL(qneg_i || pneg_i)

a two-outcome KL of the positive plus the negatives' KL, which is L_neg's row. Every N x N quantity
is then qneg, pneg and <qneg_i, z_i - logits_i> (z = <a_i, a_j>/tau_s); 1 - p_ii and 1 - q_ii come
from log-normalisers (exp(lse_negatives - lse_all)), not from subtracting probabilities. The gradient
is written out: d/dlogits_ij = (p_ij - y_ij) for L_soft and (pneg_ij - qneg_ij) for L_neg, per row,
over the row count. The tests check both against the formulas above term by term.

Sources (`target`):
- "teacher": a, b are the score stage's teacher embeddings of the batch (teacher_image, teacher_text),
  L2-normalised here (they arrive as float16) and detached. text_targets="sentence" takes b from the
  score stage's sentence-transformers embeddings (sentence_emb) instead of the CLIP teacher's text side.
  tau_s unset: 0.01 = 1/100, the learned temperature of open_clip's pretrained teachers (their logit
  scale sits at the cap). The train stage passes tau_s = 1 / (the scoring teacher's logit scale,
  scores/_summary.json) when that file exists (pipelines/train.py `resolve`), for this target only.
- "self": a, b are the student's own features, detached (stop-gradient: otherwise the target
  collapses onto the prediction); tau_s unset: 1/s of the student, detached (the train stage never
  sets it: the targets are the student's, at the student's temperature).

Noise-adaptive alpha (our extension): set alpha_min and alpha_max and pass clean_prob c;
alpha_i = alpha_min + (alpha_max - alpha_min) * (1 - c_i), so a doubted pair leans on its neighbours.

Distributed: v, t are gathered with grad and a, b without; rows are local, columns global (see
ClipLoss: each rank averages over its rows, the mean over ranks is the global loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from train.losses.clip import ClipLoss, flat

TEACHER_TAU = 0.01


class SoftClipLoss(ClipLoss):
    """forward(image_features, text_features, logit_scale, teacher_image=None, teacher_text=None,
    clean_prob=None) -> {"loss", "soft", "neg"}."""

    takes_weight = False

    def __init__(self, alpha: float = 0.2, beta: float = 1.0, target: str = "teacher", tau_s: float | None = None,
                 alpha_min: float | None = None, alpha_max: float | None = None, text_targets: str = "clip",
                 rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__(rank, world_size, gather_with_grad)
        if target not in ("teacher", "self"):
            raise ValueError(f"SoftClipLoss target must be 'teacher' or 'self', got {target!r}")
        if text_targets not in ("clip", "sentence"):
            raise ValueError(f"SoftClipLoss text_targets must be 'clip' or 'sentence', got {text_targets!r}")
        if text_targets == "sentence" and target != "teacher":
            raise ValueError("SoftClipLoss text_targets='sentence' takes the score stage's sentence embeddings: "
                             "it needs target='teacher'")
        if (alpha_min is None) != (alpha_max is None):
            raise ValueError("SoftClipLoss: set both alpha_min and alpha_max for the noise-adaptive alpha, or neither")
        for name, value in (("alpha", alpha), ("alpha_min", alpha_min), ("alpha_max", alpha_max)):
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"SoftClipLoss {name} must be in [0, 1], got {value}")
        if tau_s is not None and tau_s <= 0:
            raise ValueError(f"SoftClipLoss tau_s must be > 0, got {tau_s}")
        self.alpha, self.beta, self.target, self.tau_s = alpha, beta, target, tau_s
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        self.score_fields = {}  # what the batch must carry: teacher embeddings, clean_prob for the adaptive alpha
        if target == "teacher":
            self.score_fields.update(teacher_image="teacher_image_emb",
                                     teacher_text="sentence_emb" if text_targets == "sentence" else "teacher_text_emb")
        if alpha_min is not None:
            self.score_fields["clean_prob"] = "clean_prob"

    def forward(self, image_features, text_features, logit_scale, teacher_image=None, teacher_text=None,
                clean_prob=None) -> dict[str, torch.Tensor]:
        v, t = flat(image_features), flat(text_features)
        all_v, all_t = self.gather(v, t)
        if all_v.shape[0] < 2:
            raise ValueError("SoftClipLoss needs at least 2 pairs in the (global) batch: the targets are over negatives")
        per_image, per_text = self.logits(v, t, all_v, all_t, logit_scale)
        positives = self.positives(v.shape[0], v.device)
        with torch.no_grad():
            z_image, z_text = self.scaled_self_similarity(v, t, all_v, all_t, logit_scale, teacher_image, teacher_text)
            alpha = self.alphas(clean_prob, v)
        soft_i2t, neg_i2t = SoftTargetKL.apply(wide(per_image), wide(z_image), wide(alpha), positives)
        soft_t2i, neg_t2i = SoftTargetKL.apply(wide(per_text), wide(z_text), wide(alpha), positives)
        soft, neg = (soft_i2t + soft_t2i) / 2, (neg_i2t + neg_t2i) / 2
        return {"loss": soft + self.beta * neg, "soft": soft, "neg": neg}

    def scaled_self_similarity(self, v, t, all_v, all_t, logit_scale, teacher_image, teacher_text):
        """(S_I / tau_s, S_T / tau_s): local rows against gathered columns, from detached features only."""
        if self.target == "self":
            a, all_a, b, all_b = v.detach(), all_v.detach(), t.detach(), all_t.detach()
            tau_s = self.tau_s if self.tau_s is not None else 1.0 / torch.as_tensor(logit_scale).detach()
        else:
            if teacher_image is None or teacher_text is None:
                raise ValueError("SoftClipLoss(target='teacher') needs teacher_image and teacher_text (the score "
                                 "stage's teacher_image_emb / teacher_text_emb); use target='self' before scores exist")
            a = F.normalize(flat(teacher_image).detach().to(v.dtype), dim=-1)
            b = F.normalize(flat(teacher_text).detach().to(v.dtype), dim=-1)
            all_a, all_b = self.gather(a, b)
            tau_s = self.tau_s if self.tau_s is not None else TEACHER_TAU
        return (a / tau_s) @ all_a.T, (b / tau_s) @ all_b.T  # scale the n x d side, not the n x N product

    def alphas(self, clean_prob, v) -> torch.Tensor:
        """alpha per local pair: fixed, or alpha_min + (alpha_max - alpha_min) * (1 - c_i)."""
        if self.alpha_min is None:
            return torch.full((v.shape[0],), self.alpha, dtype=v.dtype, device=v.device)
        if clean_prob is None:
            raise ValueError("SoftClipLoss with alpha_min/alpha_max (noise-adaptive alpha) needs clean_prob "
                             "(the score stage's per-pair clean probability)")
        c = clean_prob.detach().to(dtype=v.dtype, device=v.device).reshape(-1)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * (1 - c)


class SoftTargetKL(torch.autograd.Function):
    """(mean_i KL(y_i || p_i), mean_i KL(qneg_i || pneg_i)) of one direction; gradient to the logits only.

    logits (n, N) are the local rows; z (n, N) = S / tau_s, detached, is consumed (overwritten);
    alpha (n,); positives (n,) the column of each row's own partner.
    """

    @staticmethod
    def forward(ctx, logits, z, alpha, positives):
        rows = torch.arange(logits.shape[0], device=logits.device)
        z_pos = z[rows, positives]
        q_neg, log_norm_q_neg = negatives_softmax(z.clone(memory_format=torch.contiguous_format), positives)
        log_norm_q = torch.logaddexp(log_norm_q_neg, z_pos)
        p_neg = logits.detach().clone(memory_format=torch.contiguous_format)  # becomes pneg, in place
        z.sub_(p_neg)  # z - logits, for <qneg, z - logits>; qneg is 0 at the positive
        cross = torch.bmm(q_neg.unsqueeze(1), z.unsqueeze(2)).view(-1)  # row-wise dot, no n x N temporary
        p_neg, log_norm_p_neg = negatives_softmax(p_neg, positives)
        logit_pos = logits.detach()[rows, positives]
        log_norm_p = torch.logaddexp(log_norm_p_neg, logit_pos)

        kl_neg = cross - log_norm_q_neg + log_norm_p_neg                # sum_j qneg (log qneg - log pneg)
        a = alpha * torch.exp(log_norm_q_neg - log_norm_q)             # target mass off the positive: alpha (1 - q_ii)
        log_b = log_norm_p_neg - log_norm_p                            # log(1 - p_ii)
        log_p_pos = logit_pos - log_norm_p                             # log p_ii
        binary = torch.xlogy(1 - a, 1 - a) - (1 - a) * log_p_pos + torch.xlogy(a, a) - a * log_b
        soft = binary + a * kl_neg

        ctx.save_for_backward(p_neg, q_neg, a, log_b.exp(), positives)
        return soft.mean(), kl_neg.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_soft, grad_neg):
        p_neg, q_neg, a, b, positives = ctx.saved_tensors
        n = p_neg.shape[0]
        # off the positive: grad_soft (b pneg - a qneg) + grad_neg (pneg - qneg); at it: grad_soft (a - b)
        grad = p_neg * ((grad_soft * b + grad_neg) / n)[:, None]  # not in place: backward may run again
        grad.addcmul_(q_neg, (-(grad_soft * a + grad_neg) / n)[:, None])
        grad[torch.arange(n, device=grad.device), positives] = grad_soft * (a - b) / n
        return grad, None, None, None


def wide(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (autocast) as float32: the softmaxes and logs below need the range."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def negatives_softmax(x: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of each row over its negatives (the positive masked to -inf: 0 there) and their
    logsumexp. In place on x: pass a tensor you own."""
    x[torch.arange(x.shape[0], device=x.device), positives] = float("-inf")
    shift = x.amax(1, keepdim=True)  # the largest negative: no negative under- or overflows
    total = x.sub_(shift).exp_().sum(1, keepdim=True)
    return x.div_(total), (shift + total.log()).view(-1)


def soft_target(scaled_sim: torch.Tensor, alpha: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """y = (1 - alpha_i) onehot(positive_i) + alpha_i softmax_j(scaled_sim[i, j]), materialised (for
    inspection and tests; the loss never builds it)."""
    rows = torch.arange(scaled_sim.shape[0], device=scaled_sim.device)
    y = alpha[:, None] * scaled_sim.softmax(1)
    y[rows, positives] += 1 - alpha
    return y
