"""Evaluation: image-text retrieval recall (zero-shot and Distribution Normalization come with issue 6)."""

from __future__ import annotations

import torch


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """R@k both ways for aligned pairs (row i of each is pair i); a tie counts against the true partner."""
    sim = image_features @ text_features.T
    true = sim.diagonal()
    i2t_rank = (sim >= true[:, None]).sum(1) - 1  # texts scoring at least as high as the true one, itself excluded
    t2i_rank = (sim >= true[None, :]).sum(0) - 1
    return {f"{name}_R@{k}": (rank < k).float().mean().item()
            for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)) for k in ks}
