"""Per-pair noise scores (docs/METHODS.md section 3): posterior at the teacher's temperature, loss, mixture.

Plain functions on arrays. Inputs are L2-normalised (and, for the posterior, DN-centred) embeddings;
the teacher's learned inverse temperature `scale` = exp(logit_scale).
"""

from __future__ import annotations

import hashlib

import numpy as np

FOLD_SEED = 6  # offset of the config seed for the held-out folds (pipelines/score.py's samples use 1-5)


def key_ranks(keys: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random rank per key: the n smallest are "a seeded sample of n pairs".

    Hashing the key (not drawing from a generator over positions) makes the sample independent of
    shard order and task timing, so a resumed or re-ordered run picks the same pairs.
    """
    salt = f"{seed}:".encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64, count=len(keys))


def folds_of(keys: list[str], seed: int, folds: int) -> np.ndarray:
    """Each pair's fold, from its key alone (the same in the train and score stages, in any shard order)."""
    return (key_ranks(keys, seed + FOLD_SEED) % np.uint64(folds)).astype(np.int64)


def held_out_loss(losses: list[np.ndarray], keys: list[str], seed: int) -> np.ndarray:
    """Each pair's loss under the fold teacher that never trained on it. losses[0] is the whole teacher's,
    losses[1 + k] the teacher trained without fold k: a pair it never saw cannot have been memorised
    (a unique caption learnt as its image's name), so its loss says whether the caption fits the image."""
    folds = folds_of(keys, seed, len(losses) - 1)
    return np.stack(losses[1:], axis=1)[np.arange(len(keys)), folds]


def pair_losses(teacher: dict, averaged: list[int], losses: list[np.ndarray], keys: list[str]) -> np.ndarray:
    """Each pair's loss: under the held-out rule the fold teacher's that never saw it, else the mean over `averaged`."""
    if teacher["loss_rule"] == "held_out":
        return held_out_loss(losses, keys, teacher["fold_seed"])
    return np.mean([losses[j] for j in averaged], axis=0)


def cosine_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """The raw "CLIP score" of each pair (DataComp's filter), the baseline kept beside the posterior."""
    return (image_emb * text_emb).sum(-1)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def pair_posterior(v: np.ndarray, t: np.ndarray, bank_v: np.ndarray, bank_t: np.ndarray, scale: float,
                   self_in_bank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """log p_i2t, log p_t2i: the true partner's softmax probability against itself plus the bank's M others.

    p_i2t = exp(s<v_i,t_i>) / (exp(s<v_i,t_i>) + sum_j exp(s<v_i,t_j>)), j over the bank; p_t2i likewise.
    `self_in_bank` (n, M) marks bank entries that are the pair itself: they are not its negatives.
    """
    positive = scale * (v * t).sum(-1)
    negatives = [scale * v @ bank_t.T, scale * t @ bank_v.T]
    logs = []
    for neg in negatives:
        if self_in_bank is not None:
            neg = np.where(self_in_bank, -np.inf, neg)
        logs.append(positive - logsumexp(np.concatenate([positive[:, None], neg], axis=1)))
    return logs[0], logs[1]


def pair_loss(log_p_i2t: np.ndarray, log_p_t2i: np.ndarray) -> np.ndarray:
    """l_i = -1/2 (log p_i2t + log p_t2i): the pair's contrastive loss against the bank."""
    return -0.5 * (log_p_i2t + log_p_t2i)


def fit_mixture(losses: np.ndarray, seed: int) -> dict:
    """Two 1-D Gaussians on the per-pair losses (as NCR fits its training losses); component 0 is clean.

    Returned as plain numbers (weights, means, variances) so it travels in JSON and to every worker.
    """
    from sklearn.mixture import GaussianMixture

    losses = np.asarray(losses, dtype=np.float64).reshape(-1, 1)
    if len(losses) < MIN_MIXTURE_PAIRS:
        raise ValueError(f"{len(losses)} scored pairs are too few to fit the noise mixture "
                         f"(need at least {MIN_MIXTURE_PAIRS})")
    gmm = GaussianMixture(2, covariance_type="full", tol=1e-6, max_iter=500, reg_covar=1e-6,
                          random_state=seed).fit(losses)
    order = np.argsort(gmm.means_.ravel())  # the low-loss component is the clean one
    return {"weights": gmm.weights_[order].tolist(), "means": gmm.means_.ravel()[order].tolist(),
            "variances": gmm.covariances_.ravel()[order].tolist(), "converged": bool(gmm.converged_)}


MIN_MIXTURE_PAIRS = 50


def clean_probability(mixture: dict, losses: np.ndarray) -> np.ndarray:
    """Posterior of the clean (low-loss) component, made non-increasing in the loss.

    A Gaussian mixture's posterior turns back towards the wide component in the narrow one's far tail
    (a pair with a tiny loss would look "noisy" because the clean component is narrow). So the
    posterior is evaluated on a grid fixed by the mixture alone (every shard sees the same curve),
    held at its peak below it, running-minimum above it, and interpolated.
    """
    w, mu, var = (np.asarray(mixture[k], dtype=np.float64) for k in ("weights", "means", "variances"))
    sd = np.sqrt(var)
    grid = np.linspace(mu.min() - 10 * sd.max(), mu.max() + 10 * sd.max(), 8193)
    log_pdf = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (grid[:, None] - mu) ** 2 / var
    posterior = np.exp(log_pdf[:, 0] - logsumexp(log_pdf))
    peak = int(np.argmax(posterior))
    curve = np.concatenate([np.full(peak, posterior[peak]), np.minimum.accumulate(posterior[peak:])])
    return np.interp(np.asarray(losses, dtype=np.float64), grid, curve)


def estimated_noise(losses: np.ndarray, seed: int) -> float:
    """1 - mean clean_prob: the share of pairs the two-Gaussian mixture on these losses calls noisy."""
    return float(1 - clean_probability(fit_mixture(losses, seed), losses).mean())


def early_learning_end(epochs: list[int], noise: list[float]) -> int:
    """The epoch whose per-pair losses look noisiest (the first such): the end of early learning.

    A CLIP trained on noisy pairs fits the clean ones first, then memorises the mismatched ones, which
    then leave the mixture's high-loss component: the noise it finds rises while the clean pairs are
    learned and falls once memorisation starts.
    """
    return min(epochs, key=lambda e: (-noise[epochs.index(e)], e))


def temperature_noise_indicator(scale: float, positive_sim: np.ndarray, negative_sim: np.ndarray, batch: int) -> float:
    """eta_hat = (N-1) / ((N-1) + exp(s * Delta)), Delta = mean positive - mean negative similarity.

    The toy equilibrium of docs/METHODS.md section 2 inverted: a relative indicator of how noisy the data
    the teacher saw was (compare datasets with it), never the noise rate itself.
    """
    delta = float(np.mean(positive_sim) - np.mean(negative_sim))
    return float((batch - 1) / ((batch - 1) + np.exp(min(scale * delta, 700.0))))


def auroc(is_noisy: np.ndarray, noisiness: np.ndarray) -> float:
    """Area under the ROC curve for finding the noisy pairs by a score that is high when noisy."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(is_noisy, dtype=bool), np.asarray(noisiness, dtype=np.float64)))


NOISY_WHEN = {"clean_prob": -1.0, "loss": 1.0, "cosine": -1.0, "dn_score": -1.0}  # the sign that makes a score high when noisy


def detection_report(noisy: np.ndarray, kinds: np.ndarray | None, scores: dict[str, np.ndarray], threshold: float = 0.5) -> dict:
    """Against labels: the AUROC of each score (NOISY_WHEN) for the noisy pairs, and for each noise kind against
    the clean pairs alone; the noise rate 1 - mean(clean_prob) beside the labelled one; the share of the clean
    pairs and of each kind flagged (clean_prob < threshold)."""
    noisy = np.asarray(noisy, dtype=bool)
    flagged = np.asarray(scores["clean_prob"]) < threshold

    def aurocs(mask: np.ndarray) -> dict:
        return {name: auroc(noisy[mask], NOISY_WHEN[name] * np.asarray(values)[mask]) for name, values in scores.items()}

    report = {"pairs": len(noisy), "noisy": int(noisy.sum()),
              "noise_rate": {"estimated": float(1 - np.mean(scores["clean_prob"])), "labelled": float(noisy.mean())},
              "clean_flagged": float(flagged[~noisy].mean()), "auroc": aurocs(np.ones(len(noisy), dtype=bool))}
    if kinds is not None:
        kinds = np.asarray(kinds, dtype=object)
        report["by_kind"] = {str(kind): {"pairs": int((kinds == kind).sum()), "flagged": float(flagged[kinds == kind].mean()),
                                         "auroc": aurocs((kinds == kind) | ~noisy)}
                             for kind in sorted(set(kinds[noisy]) - {None})}
    return report
