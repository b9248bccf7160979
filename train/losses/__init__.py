"""The training objectives, one small module each (docs/METHODS.md); every forward returns a dict of named
terms with "loss" the total to backpropagate.

    clip      ClipLoss       symmetric InfoNCE, local loss against gathered features
    softclip  SoftClipLoss   soft targets from intra-modal self-similarity (+ disentangled negatives)
    oblique   ObliqueLoss    K-token features on the oblique manifold (or one sphere), capped logit scale
    mmcl      MMCLLoss       the phi/psi family of Nakada et al. (+ UnpairedLoss, teacher_pairs, joint)
"""

from train.losses.clip import ClipLoss
from train.losses.mmcl import MMCLLoss, Pairs, UnpairedLoss, joint, teacher_pairs
from train.losses.oblique import ObliqueLoss
from train.losses.softclip import SoftClipLoss

LOSSES = {"clip": ClipLoss, "softclip": SoftClipLoss, "oblique": ObliqueLoss, "mmcl": MMCLLoss}

__all__ = ["LOSSES", "ClipLoss", "MMCLLoss", "ObliqueLoss", "Pairs", "SoftClipLoss", "UnpairedLoss", "build_loss",
           "joint", "teacher_pairs"]


def build_loss(name: str, **kwargs):
    """The loss called `name`, built with `kwargs` (an unknown keyword raises TypeError naming it)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)
