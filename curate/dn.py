"""Distribution Normalization (Zhou et al., NeurIPS 2023): subtract a fraction of each modality's mean.

`S_DN(x, y) = (v - lam * mu_v) . (t - lam * mu_t)`: the first-order term of InfoNCE, with the
negatives approximated by the mean embedding. The means come from a seeded sample of unlabeled data.
"""

from __future__ import annotations

import numpy as np


def dn_means(image_emb: np.ndarray, text_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the L2-normalised embeddings of each modality (float64, so the sum order does not matter)."""
    return normalise(image_emb).mean(0), normalise(text_emb).mean(0)


def dn_center(emb: np.ndarray, mean: np.ndarray, lam: float = 0.5) -> np.ndarray:
    """Retrieval form: normalise first, subtract after, no re-normalisation."""
    return normalise(emb) - lam * mean


def normalise(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
